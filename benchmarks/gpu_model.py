"""Whole-model decode speed of GRIFFIN on a GPU, without vLLM: dense vs GRIFFIN vs the
half-FF ceiling, side by side in one process.

    python benchmarks/gpu_model.py --out gpu_model.json          # Llama-3-8B shape, on a CUDA machine
    python benchmarks/gpu_model.py --tiny --device cpu --batches 1,2 --steps 2   # CPU smoke run (Triton interpreter)

The model is a plain-torch Llama decoder (Llama-3-8B's shape by default: hidden 4096,
FF 14336, 32 layers, 32/8 heads, vocab 128256) with random bf16 weights made on the
device; it needs torch, Triton and ``vllm_griffin.core.algorithm`` / ``vllm_griffin.ops``
only, so it runs where vLLM is not installed.

Per batch size: one prefill of random prompts with the full MLP, capturing each
sequence's prompt statistic per layer as the engine does on a GPU
(``ops.reference.capture_reference``: z**2 / ||z||**2 summed over the prompt), then
the top-k experts per sequence and layer (``algorithm.topk_experts_and_masks``, the
engine's batched selection). Every decode step then runs, per config:

* ``dense``          -- the full MLP (cuBLAS): the baseline;
* ``griffin@d``      -- each row's experts through the Triton kernels vLLM-griffin runs
  (``ops.triton_experts``), on ``ExpertWeights.separate`` as the engine builds them on GPUs;
* ``half-ff``        -- a dense twin with FF = 7168 (its own random MLPs): the ceiling
  for density 0.5, as the same bytes streamed with no gather at all.

Which kernel a GRIFFIN step runs (``--path``):

* ``union`` (default) -- the per-row kernel (``experts_mlp_triton``) for one row, the
  union-tiled kernel (``experts_mlp_triton_union``, from the rows' masks as the
  engine's CUDA-graph decode passes them) for more;
* ``rows``   -- the per-row kernel at every batch size;
* ``engine`` -- what vLLM-griffin's CUDA-graph decode records today:
  ``dispatch.choose_path`` with the shipped GPU cost model, priced with the largest
  union the rows can have (``graph_decode.path_for``); ``masked`` runs the dense GEMMs
  with each row's non-experts zeroed.

Every config's decode step (attention over a static KV cache, all layers, LM head)
is captured in one CUDA graph per batch size and replayed ``--steps`` times per
round; the configs take turns in ``--rounds`` rounds (rotated order) so drift hits
all alike; the median round gives ms/step. All configs share one KV cache, written
by the dense prefill: the twin's attention reads the same amount either way.

Before timing, a correctness check on one batch (``--skip-check`` skips it): GRIFFIN
through each Triton kernel (and the masked path) equals a plain-torch decode through
``experts_mlp_gather`` (float32 math on the same weights) with the same experts, and
GRIFFIN at density 1.0 equals dense; per layer (each MLP on the same input) and in the
logits of a whole step, whose bf16 tolerance scales with the dense model's own
rounding noise (``correctness_check``). A failed check is reported (JSON, exit 1),
and the timings still run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from vllm_griffin.core import algorithm
from vllm_griffin.ops import dispatch
from vllm_griffin.ops.reference import ExpertWeights, capture_reference, experts_mlp_gather

WEIGHT_STD = 0.02   # Llama's initializer_range: activations stay O(1) through 32 layers
HALF_FF = "half-ff"
DENSE = "dense"
PATHS = ("union", "rows", "engine")
# Correctness check, as ||got - want|| / ||want||. Per layer (one MLP call on the same
# input): float32 differs by summation order only; bf16 by where h and the output are
# rounded (the union kernel rounds act(g) * u to bf16 as vLLM's dense path does, the
# per-row kernel keeps it in float32), as tests/test_triton_union.py allows.
LAYER_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
# Logits of a whole decode step: at least this, or NOISE_FACTOR x the dense model's own
# rounding noise (correctness_check).
LOGITS_TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}
NOISE_FACTOR = 3.0
# GRIFFIN at density 0.5 must differ from dense by this many tolerances, or the check
# could not tell a wrong MLP from a right one.
CHECK_MARGIN = 3.0


@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float = 500000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LLAMA3_8B = Shape(hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
TINY = Shape(hidden=64, ffn=256, layers=2, heads=4, kv_heads=2, vocab=256)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    d = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :d]) * gate_up[..., d:]


def triton_kernels():
    # Imported on first use: TRITON_INTERPRET is read when the kernels are defined,
    # and the prefill and the torch oracle need no Triton at all.
    from vllm_griffin.ops import triton_experts

    return triton_experts


# --- the model ---------------------------------------------------------------------


@dataclass
class AttentionWeights:
    norm: torch.Tensor   # [H]
    qkv: torch.Tensor    # [(heads + 2 kv_heads) * head_dim, H], merged as vLLM keeps it
    o: torch.Tensor      # [H, heads * head_dim]


class MLPWeights:
    """One layer's MLP as vLLM keeps it (merged gate_up [2D, H], down [H, D]) plus the
    expert kernels' view of it, built once: ``ExpertWeights.separate`` over the same
    gate_up storage and a transposed copy of down, as the engine does on GPUs."""

    def __init__(self, norm: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor):
        self.norm, self.gate_up, self.down = norm, gate_up, down
        self._experts: ExpertWeights | None = None

    @property
    def width(self) -> int:
        return self.down.shape[1]

    @property
    def experts(self) -> ExpertWeights:
        if self._experts is None:
            self._experts = ExpertWeights.separate(self.gate_up, self.down.t().contiguous())
        return self._experts


class Llama:
    """A Llama decoder's weights, random (normal, std WEIGHT_STD; norms 1), made on ``device``."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.shape, self.dtype, self.device = shape, dtype, device
        gen = torch.Generator(device=device).manual_seed(seed)
        H, hd = shape.hidden, shape.head_dim
        self.embed = self._random(gen, shape.vocab, H)
        self.attention = [AttentionWeights(self._ones(H),
                                           self._random(gen, (shape.heads + 2 * shape.kv_heads) * hd, H),
                                           self._random(gen, H, shape.heads * hd))
                          for _ in range(shape.layers)]
        self.mlps = self._random_mlps(gen, shape.ffn)
        self.norm = self._ones(H)
        self.lm_head = self._random(gen, shape.vocab, H)

    def _random(self, gen: torch.Generator, *size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=self.device, dtype=self.dtype).mul_(WEIGHT_STD)

    def _ones(self, n: int) -> torch.Tensor:
        return torch.ones(n, device=self.device, dtype=self.dtype)

    def _random_mlps(self, gen: torch.Generator, ffn: int) -> list[MLPWeights]:
        H = self.shape.hidden
        return [MLPWeights(self._ones(H), self._random(gen, 2 * ffn, H), self._random(gen, H, ffn))
                for _ in range(self.shape.layers)]

    def with_ffn(self, ffn: int, seed: int) -> Llama:
        """A twin sharing embeddings, attention and LM head, with its own random MLPs of width ``ffn``."""
        twin = object.__new__(Llama)
        twin.__dict__.update(self.__dict__)
        twin.shape = Shape(**{**asdict(self.shape), "ffn": ffn})
        twin.mlps = twin._random_mlps(torch.Generator(device=self.device).manual_seed(seed), ffn)
        return twin


class KVCache:
    """Static [batch, kv_heads, max_len, head_dim] keys and values per layer, and the
    RoPE tables: fixed addresses and shapes, so a decode step can be graph-captured."""

    def __init__(self, shape: Shape, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        size = (shape.layers, batch, shape.kv_heads, max_len, shape.head_dim)
        self.k = torch.zeros(size, dtype=dtype, device=device)
        self.v = torch.zeros(size, dtype=dtype, device=device)
        self.key_positions = torch.arange(max_len, device=device)
        hd = shape.head_dim
        inv_freq = 1.0 / shape.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
        angles = torch.outer(self.key_positions.float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # HF Llama's rotate-half layout
        self.cos, self.sin = angles.cos(), angles.sin()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, T, heads, hd]; cos/sin [T, hd]
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def attention(w: AttentionWeights, h: torch.Tensor, layer: int, positions: torch.Tensor, visible: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, shape: Shape) -> torch.Tensor:
    """GQA over the static cache: this step's keys/values are written at ``positions``, then
    every query attends to the cache positions ``visible`` marks ([T, max_len]). Same math
    as SDPA with a boolean mask; written as two batched matmuls over the cache so the
    query heads of a KV head share its keys without copying them."""
    B, T, _ = h.shape
    nq, nkv, hd = shape.heads, shape.kv_heads, shape.head_dim
    group = nq // nkv
    q, k, v = F.linear(h, w.qkv).split([nq * hd, nkv * hd, nkv * hd], dim=-1)
    q = apply_rope(q.view(B, T, nq, hd), cos, sin)
    k = apply_rope(k.view(B, T, nkv, hd), cos, sin)
    cache.k[layer].index_copy_(2, positions, k.transpose(1, 2))
    cache.v[layer].index_copy_(2, positions, v.view(B, T, nkv, hd).transpose(1, 2))
    # Query head i*group + g reads KV head i (HF's repeat_kv order).
    q = q.view(B, T, nkv, group, hd).permute(0, 2, 3, 1, 4).reshape(B, nkv, group * T, hd)
    scores = torch.matmul(q, cache.k[layer].transpose(-1, -2)).float() * hd ** -0.5
    max_len = scores.shape[-1]
    scores = scores.view(B, nkv, group, T, max_len).masked_fill(~visible, float("-inf"))
    probs = scores.softmax(-1).to(h.dtype).view(B, nkv, group * T, max_len)
    out = torch.matmul(probs, cache.v[layer]).view(B, nkv, group, T, hd)
    return F.linear(out.permute(0, 3, 1, 2, 4).reshape(B, T, nq * hd), w.o)


def forward(model: Llama, mlp, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """tokens [B, T] at ``positions`` [T] (the same for every sequence) -> the last
    position's logits [B, vocab]. ``mlp(layer, x [B*T, H]) -> [B*T, H]`` is the config's MLP."""
    shape = model.shape
    B, T = tokens.shape
    x = model.embed[tokens]
    visible = cache.key_positions[None, :] <= positions[:, None]
    cos, sin = cache.cos[positions], cache.sin[positions]
    for layer in range(shape.layers):
        attn = model.attention[layer]
        x = x + attention(attn, rms_norm(x, attn.norm, shape.eps), layer, positions, visible, cos, sin, cache, shape)
        h = rms_norm(x, model.mlps[layer].norm, shape.eps)
        x = x + mlp(layer, h.view(B * T, -1)).view(B, T, -1)
    return F.linear(rms_norm(x[:, -1], model.norm, shape.eps), model.lm_head)


# --- the MLP of each config ------------------------------------------------------------


def dense_mlp(model: Llama):
    def mlp(layer: int, x: torch.Tensor) -> torch.Tensor:
        w = model.mlps[layer]
        return F.linear(silu_and_mul(F.linear(x, w.gate_up)), w.down)
    return mlp


class PrefillCapture:
    """The full MLP, adding each prompt token's z**2 / ||z||**2 to its sequence's statistic
    per layer, as the engine captures on GPUs (``capture_reference``). ``keep`` also
    keeps each layer's MLP input and z (tests)."""

    def __init__(self, model: Llama, batch: int, tokens_per_sequence: int, keep: bool = False):
        self.model = model
        self.stat_sums = torch.zeros(model.shape.layers, batch, model.shape.ffn, dtype=torch.float32,
                                     device=model.device)
        self.sequence_of_token = torch.arange(batch, device=model.device).repeat_interleave(tokens_per_sequence)
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if keep else None

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w = self.model.mlps[layer]
        z = silu_and_mul(F.linear(x, w.gate_up))
        capture_reference(z, None, None, self.stat_sums[layer], self.sequence_of_token)
        if self.kept is not None:
            self.kept.append((x.clone(), z.clone()))
        return F.linear(z, w.down)


@dataclass
class Selection:
    """One density's experts for a batch: per layer, the rows' expert tables [B, k] int32
    and masks [B, D] bool (both kept: the per-row kernel reads tables, the union kernel
    and the masked path masks), counts [B] int32, and the union size per layer."""

    density: float
    k: int
    experts: list[torch.Tensor]
    masks: list[torch.Tensor]
    counts: torch.Tensor
    union_sizes: list[int]

    @property
    def union_fraction(self) -> float:
        """Mean over layers of the distinct neurons the batch's rows use, over D."""
        width = self.masks[0].shape[1]
        return sum(self.union_sizes) / len(self.union_sizes) / width


def select(stat_sums: torch.Tensor, density: float) -> Selection:
    """Each sequence's top-k experts per layer from its prompt statistic (``stat_sums`` [L, B, D])."""
    layers, batch, width = stat_sums.shape
    k = algorithm.num_experts(density, width)
    experts, masks, unions = [], [], []
    for layer in range(layers):
        idx, mask = algorithm.topk_experts_and_masks(stat_sums[layer], k)
        experts.append(idx.to(torch.int32))
        masks.append(mask)
        unions.append(int(mask.any(0).sum()))
    counts = torch.full((batch,), k, dtype=torch.int32, device=stat_sums.device)
    return Selection(density, k, experts, masks, counts, unions)


def decode_path(mode: str, rows: int, width: int, k: int) -> str:
    """The GRIFFIN path of a decode step of ``rows`` rows at ``k`` experts each."""
    if mode == "rows":
        return "triton"
    if mode == "union":
        return "triton" if rows == 1 else "triton_union"
    if mode == "engine":
        # graph_decode.path_for: GPU cost model, the largest union the rows can have.
        products = rows * k
        return dispatch.choose_path(torch.device("cuda"), True, rows, width, min(width, products), products)
    raise ValueError(f"path={mode!r} is invalid; allowed: {', '.join(PATHS)}")


def griffin_mlp(model: Llama, sel: Selection, path: str, row_options: dict | None = None):
    """Each decode row through its own experts by ``path``: ``triton`` (per-row kernel),
    ``triton_union``, ``masked`` (dense GEMMs, non-experts zeroed) or ``gather`` (the
    plain-torch oracle, float32 math on the same weights)."""
    row_options = row_options or {}

    def mlp(layer: int, x: torch.Tensor) -> torch.Tensor:
        w = model.mlps[layer]
        if path == "triton":
            return triton_kernels().experts_mlp_triton(x, w.experts, sel.experts[layer], sel.counts, "silu",
                                                       **row_options)
        if path == "triton_union":
            return triton_kernels().experts_mlp_triton_union(x, w.experts, None, None, "silu",
                                                             masks=sel.masks[layer])
        if path == "masked":
            return F.linear(silu_and_mul(F.linear(x, w.gate_up)) * sel.masks[layer], w.down)
        if path == "gather":
            e = w.experts
            exact = ExpertWeights(e.gate.float(), e.up.float(), e.down_t.float())
            return experts_mlp_gather(x.float(), exact, sel.experts[layer].long(), sel.counts,
                                      silu_and_mul).to(x.dtype)
        raise ValueError(f"unknown path {path!r}")
    return mlp


# --- one batch: prefill, then decode steps ------------------------------------------------


class Batch:
    """A batch of random prompts prefilled (full MLP, statistic captured) into a static cache,
    and the static buffers a decode step reads: the next tokens and their position."""

    def __init__(self, model: Llama, batch: int, prompt_len: int, seed: int, keep_activations: bool = False,
                 prompts: torch.Tensor | None = None):
        device = model.device
        if prompts is None:
            gen = torch.Generator(device=device).manual_seed(seed)
            prompts = torch.randint(0, model.shape.vocab, (batch, prompt_len), generator=gen, device=device)
        batch, prompt_len = prompts.shape
        self.model, self.batch, self.prompt_len, self.prompts = model, batch, prompt_len, prompts
        self.cache = KVCache(model.shape, batch, prompt_len + 1, model.dtype, device)
        self.capture = PrefillCapture(model, batch, prompt_len, keep=keep_activations)
        with torch.no_grad():
            logits = forward(model, self.capture, self.prompts, torch.arange(prompt_len, device=device), self.cache)
        self.tokens = logits.argmax(-1).unsqueeze(1)          # [B, 1]: greedy first token
        self.position = torch.tensor([prompt_len], device=device)

    @property
    def stat_sums(self) -> torch.Tensor:
        return self.capture.stat_sums

    def decode(self, model: Llama, mlp) -> torch.Tensor:
        """One decode step's logits [B, vocab] (writes the new token's keys/values at ``position``)."""
        with torch.no_grad():
            return forward(model, mlp, self.tokens, self.position, self.cache)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float64."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def dense_mlp_exact(model: Llama):
    """The dense MLP in float32 math on the same weights: the dense model's own rounding
    noise is measured against it (``noise_floor`` of the check)."""
    def mlp(layer: int, x: torch.Tensor) -> torch.Tensor:
        w = model.mlps[layer]
        return F.linear(silu_and_mul(F.linear(x.float(), w.gate_up.float())), w.down.float()).to(x.dtype)
    return mlp


def correctness_check(model: Llama, batch: int, prompt_len: int, density: float = 0.5, seed: int = 1,
                      row_options: dict | None = None) -> dict:
    """GRIFFIN's decode through each path against the plain-torch gather oracle with the same
    experts, and at density 1.0 against dense; ``batch`` >= 2 runs the union kernel on
    several rows. Two levels:

    * per layer: each path's MLP output on the dense decode's own MLP input at that layer
      (no error carried between layers: LAYER_TOLERANCE);
    * logits of a whole decode step through each path. A random deep model amplifies any
      rounding difference (bf16, 32 layers: the dense model in bf16 against itself with
      float32 MLP math differs by a few percent), so the tolerance is the dtype's base or
      NOISE_FACTOR times that measured ``noise_floor``, whichever is larger.

    Either level must also tell density ``density`` from dense by CHECK_MARGIN tolerances,
    or it could not tell a wrong MLP from a right one."""
    b = Batch(model, batch, prompt_len, seed)
    sel, full = select(b.stat_sums, density), select(b.stat_sums, 1.0)
    dense, gather = dense_mlp(model), griffin_mlp(model, sel, "gather")
    cases = {  # name: (path under test, its reference)
        "triton_vs_gather": (griffin_mlp(model, sel, "triton", row_options), gather),
        "triton_union_vs_gather": (griffin_mlp(model, sel, "triton_union"), gather),
        "masked_vs_gather": (griffin_mlp(model, sel, "masked"), gather),
        "triton_density1_vs_dense": (griffin_mlp(model, full, "triton", row_options), dense),
        "triton_union_density1_vs_dense": (griffin_mlp(model, full, "triton_union"), dense),
    }
    inputs: list[torch.Tensor] = []

    def recording_dense(layer: int, x: torch.Tensor) -> torch.Tensor:
        inputs.append(x.clone())
        return dense(layer, x)

    dense_logits = b.decode(model, recording_dense)
    gather_logits = b.decode(model, gather)
    reference_logits = {id(dense): dense_logits, id(gather): gather_logits}
    noise_floor = relative_error(dense_logits, b.decode(model, dense_mlp_exact(model)))
    layer_tol = LAYER_TOLERANCE[model.dtype]
    logits_tol = max(LOGITS_TOLERANCE[model.dtype], NOISE_FACTOR * noise_floor)

    with torch.no_grad():
        layer_errors = {name: max(relative_error(got(i, x), want(i, x)) for i, x in enumerate(inputs))
                        for name, (got, want) in cases.items()}
        layer_gather_vs_dense = min(relative_error(gather(i, x), dense(i, x)) for i, x in enumerate(inputs))
    logits_errors = {name: relative_error(b.decode(model, got), reference_logits[id(want)])
                     for name, (got, want) in cases.items()}
    logits_gather_vs_dense = relative_error(gather_logits, dense_logits)
    passed = (all(e < layer_tol for e in layer_errors.values())
              and all(e < logits_tol for e in logits_errors.values())
              and layer_gather_vs_dense > CHECK_MARGIN * layer_tol
              and logits_gather_vs_dense > CHECK_MARGIN * logits_tol)
    return {"batch": batch, "density": density, "layer_tolerance": layer_tol, "logits_tolerance": logits_tol,
            "noise_floor": noise_floor, "layer_errors": layer_errors, "logits_errors": logits_errors,
            "layer_gather_vs_dense_min": layer_gather_vs_dense, "logits_gather_vs_dense": logits_gather_vs_dense,
            "passed": passed}


# --- timing ---------------------------------------------------------------------------


def capture_graph(fn):
    """(graph, output) of ``fn`` captured once, after a warm-up on a side stream (compiles Triton)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_rounds(runners: dict, steps: int, rounds: int, device: torch.device) -> dict[str, list[float]]:
    """ms per call of each runner, one number per round; the order rotates every round."""
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    cuda = device.type == "cuda"
    if cuda:  # warm-up (a CPU run is a smoke test of the script, under the slow Triton interpreter)
        for name in names:
            runners[name]()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            run = runners[name]
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(steps):
                    run()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) / steps)
            else:
                t0 = time.perf_counter()
                for _ in range(steps):
                    run()
                times[name].append((time.perf_counter() - t0) * 1e3 / steps)
    return times


def config_name(density: float) -> str:
    return f"griffin@{density:g}"


def bench_batch(model: Llama, twin: Llama, batch: int, args, row_options: dict) -> list[dict]:
    """Every config's decode step at one batch size, timed side by side."""
    b = Batch(model, batch, args.prompt_len, seed=args.seed + 100 + batch)
    configs = {DENSE: (model, dense_mlp(model), DENSE, None)}
    for density in args.densities:
        sel = select(b.stat_sums, density)
        path = decode_path(args.path, batch, model.shape.ffn, sel.k)
        configs[config_name(density)] = (model, griffin_mlp(model, sel, path, row_options), path, sel)
    configs[HALF_FF] = (twin, dense_mlp(twin), DENSE, None)

    runners, graph_ok, errors = {}, {}, {}
    for name, (m, mlp, _, _) in configs.items():
        def step(m=m, mlp=mlp):
            return b.decode(m, mlp)
        try:
            if args.graphs:
                eager = step().clone()
                graph, out = capture_graph(step)
                graph.replay()
                graph_ok[name] = bool(torch.allclose(out.float(), eager.float(), rtol=1e-3, atol=1e-3))
                runners[name] = graph.replay
            else:
                runners[name] = step
        except Exception as e:  # one config's failure must not cost the others' numbers on a lent GPU
            if name == DENSE:
                raise
            errors[name] = f"{type(e).__name__}: {e}"
            print(f"batch {batch} {name} failed: {errors[name]}", flush=True)
    times = time_rounds(runners, args.steps, args.rounds, model.device)

    dense_ms = statistics.median(times[DENSE])
    rows = []
    for name, (m, _, path, sel) in configs.items():
        row = {"batch": batch, "config": name, "path": path, "ffn": m.shape.ffn,
               "density": None if sel is None else sel.density,
               "ms_per_step": None, "tok_per_s": None, "speedup_vs_dense": None, "round_ms": times.get(name),
               "graph_matches_eager": graph_ok.get(name),
               "union_fraction": None if sel is None else sel.union_fraction,
               "experts_fraction": None if sel is None else sel.k / m.shape.ffn}
        if name in errors:
            row["error"] = errors[name]
        else:
            ms = statistics.median(times[name])
            row.update(ms_per_step=ms, tok_per_s=batch * 1e3 / ms, speedup_vs_dense=dense_ms / ms)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| batch | config | path | ms/step | tok/s | x dense | union / D |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        union = "" if r["union_fraction"] is None else f"{r['union_fraction']:.2f}"
        if r["ms_per_step"] is None:
            lines.append(f"| {r['batch']} | {r['config']} | {r['path']} | failed | | | {union} |")
            continue
        lines.append(f"| {r['batch']} | {r['config']} | {r['path']} | {r['ms_per_step']:.3f} | "
                     f"{r['tok_per_s']:.1f} | {r['speedup_vs_dense']:.2f} | {union} |")
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tiny", action="store_true", help=f"tiny shape for CPU tests: {TINY}")
    for name in ("layers", "hidden", "ffn", "heads", "kv-heads", "vocab"):
        p.add_argument(f"--{name}", type=int, help="override the shape's value")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--densities", default="0.25,0.5,0.75")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="decode steps replayed per config and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--path", choices=PATHS, default="union", help="GRIFFIN's kernel choice (module docstring)")
    p.add_argument("--row-block-k", type=int, help="per-row kernel's block_k (default: the kernel's, as the engine)")
    p.add_argument("--row-block-h", type=int, help="per-row kernel's block_h")
    p.add_argument("--row-warps", type=int, help="per-row kernel's num_warps")
    p.add_argument("--no-graphs", action="store_true", help="time eager steps (always on a CPU)")
    p.add_argument("--skip-check", action="store_true", help="skip the correctness check")
    p.add_argument("--check-batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="gpu_model.json")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    args.batches = [int(b) for b in args.batches.split(",")]
    args.densities = [float(d) for d in args.densities.split(",")]
    args.graphs = args.device.type == "cuda" and not args.no_graphs
    base = TINY if args.tiny else LLAMA3_8B
    overrides = {f: getattr(args, f) for f in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab")
                 if getattr(args, f) is not None}
    args.shape = Shape(**{**asdict(base), **overrides})
    if args.shape.hidden % args.shape.heads or args.shape.heads % args.shape.kv_heads:
        p.error(f"{args.shape}: hidden must divide by heads, heads by kv_heads")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.type == "cpu":
        # No Triton backend for CPUs: the kernels run in Triton's interpreter (read when
        # the kernels are defined, which is on first use here).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    t0 = time.time()
    shape, device = args.shape, args.device
    row_options = {k: v for k, v in (("block_k", args.row_block_k), ("block_h", args.row_block_h),
                                     ("num_warps", args.row_warps)) if v is not None}
    model = Llama(shape, args.dtype, device, seed=args.seed)
    twin = model.with_ffn(shape.ffn // 2, seed=args.seed + 1)
    for mlp in model.mlps:
        _ = mlp.experts  # the kernels' layout, built once per layer
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "shape": asdict(shape), "dtype": str(args.dtype).removeprefix("torch."),
               "prompt_len": args.prompt_len, "steps": args.steps, "rounds": args.rounds, "graphs": args.graphs,
               "path": args.path, "row_options": row_options, "check": None, "results": []}
    try:
        import triton
        results["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"model {shape} {args.dtype} on {results['device']}; built in {time.time() - t0:.1f} s", flush=True)

    def save():  # after every stage: a run cut short by its time limit keeps what it measured
        results["seconds"] = time.time() - t0
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    if not args.skip_check:
        try:
            check = correctness_check(model, args.check_batch, args.prompt_len, seed=args.seed + 1,
                                      row_options=row_options)
        except Exception as e:  # noqa: BLE001 -- recorded; the timings still run on the lent GPU
            check = {"error": f"{type(e).__name__}: {e}", "passed": False}
        results["check"] = check
        print("check:", json.dumps(check), flush=True)
        if not check["passed"]:
            print("CHECK FAILED: timings below are of wrong kernels or a check that cannot tell", flush=True)
        save()

    for batch in args.batches:
        try:
            rows = bench_batch(model, twin, batch, args, row_options)
        except Exception as e:  # noqa: BLE001 -- recorded; the other batches still run (out of memory, say)
            results.setdefault("errors", []).append({"batch": batch, "error": f"{type(e).__name__}: {e}"})
            print(f"batch {batch} failed: {results['errors'][-1]['error']}", flush=True)
            rows = []
        results["results"].extend(rows)
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k != "round_ms"}), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the batch's graphs and cache
        save()
    print(markdown_table(results["results"]))
    goal = [r for r in results["results"] if r["batch"] == 1 and r["config"] in (config_name(0.5), HALF_FF)
            and r["ms_per_step"] is not None]
    if len(goal) == 2:
        print(f"batch 1: griffin@0.5 {goal[0]['speedup_vs_dense']:.2f}x dense (goal >= 1.45x), "
              f"half-ff ceiling {goal[1]['speedup_vs_dense']:.2f}x")
    print(f"total {results['seconds']:.1f} s")
    failed = results.get("errors") or any(r["ms_per_step"] is None for r in results["results"])
    return 0 if not failed and (results["check"] is None or results["check"]["passed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
