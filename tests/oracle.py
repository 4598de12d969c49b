"""GRIFFIN written from the paper's definition on a Hugging Face model, batch size 1.

Independent of the plugin on purpose (no vllm_griffin import): the tests hold
vLLM + plugin to this.

* prefill: full model over the prompt; each layer's FF activations
  z_t = act(gate(x_t)) * up(x_t) (OPT: relu(fc1 x_t)) are the input of the down
  projection (down_proj / fc2).
* statistic: s_j = sqrt(sum_t z_tj^2 / ||z_t||^2), computed in float64.
* experts: top-k of s, k = floor(density * D).
* decode: every later token runs only the experts' gate/up rows and down columns
  (OPT: fc1 rows and bias entries, fc2 columns; fc2's bias whole).

Where the feed-forward block sits is read off the Hugging Face modules
(``gate_proj``/``up_proj``, Phi-3's fused ``gate_up_proj``, OPT's inline
``fc1``/``fc2``), not from the plugin's table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class OracleResult:
    tokens: list[int]
    experts: list[torch.Tensor]       # per layer, sorted int64
    statistic: list[torch.Tensor]     # per layer, float64 s_j
    margins: list[float] | None = None  # per token: top-1 minus top-2 logit (variants)
    # Variants with refreshes: the first token index that a re-selection with a near-tie
    # at its top-k boundary (float64 here, float32 in the engine) could change.
    selection_tie: int | None = None
    # Teacher-forced runs (``forced``): per token, the oracle's top logit minus the logit of
    # the token taken; 0 where it is the oracle's own greedy choice.
    regrets: list[float] | None = None

    def tokens_to_compare(self, min_margin: float = 0.1) -> list[int]:
        """The tokens up to the first near-tie (``margins``, ``selection_tie``): a float32 engine
        may pick either side of a tie, and from there on the two generations are different texts."""
        if self.margins is None:
            return self.tokens
        ties = [i for i, m in enumerate(self.margins) if m < min_margin]
        if self.selection_tie is not None:
            ties.append(self.selection_tie)
        return self.tokens[: min(ties)] if ties else self.tokens


def statistic_from_activations(z: torch.Tensor) -> torch.Tensor:
    sq = z.double().square()
    norms = sq.sum(-1, keepdim=True)
    # A token whose activations are all zero (possible with ReLU) adds nothing.
    return torch.where(norms > 0, sq / norms, torch.zeros_like(sq)).sum(0).sqrt()


def decoder_layers(model):
    inner = model.model
    return inner.decoder.layers if hasattr(inner, "decoder") else inner.layers


def ffn(layer):
    """(host module, name of its down projection) for a Hugging Face decoder layer."""
    if hasattr(layer, "mlp"):
        return layer.mlp, "down_proj"
    return layer, "fc2"  # OPT: fc1/fc2 inline in the layer


@torch.no_grad()
def griffin_generate(model, prompt_ids: list[int], density: float, max_new_tokens: int) -> OracleResult:
    layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(layers):
        host, down = ffn(layer)
        # [tokens, D] whatever the layer's layout (OPT flattens the batch first).
        hooks.append(getattr(host, down).register_forward_pre_hook(
            lambda mod, args, i=i: captured.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]).clone())))
    try:
        out = model(torch.tensor([prompt_ids]), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    host, down = ffn(layers[0])
    width = getattr(host, down).in_features
    k = int(width * density)
    stats = [statistic_from_activations(captured[i]) for i in range(len(layers))]
    experts = [torch.topk(s, k).indices.sort().values for s in stats]

    originals = [_restrict(layer, idx) for layer, idx in zip(layers, experts)]
    try:
        tokens = [int(out.logits[0, -1].argmax())]
        past = out.past_key_values
        while len(tokens) < max_new_tokens:
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
    finally:
        for layer, saved in zip(layers, originals):
            host, _ = ffn(layer)
            for name, module in saved.items():
                setattr(host, name, module)
    return OracleResult(tokens=tokens, experts=experts, statistic=stats)


def _restrict(layer, idx: torch.Tensor) -> dict:
    """Swap the layer's FF linears for ones holding only the experts; returns the originals."""
    host, down = ffn(layer)
    if hasattr(host, "gate_proj"):
        row_cut = {"gate_proj": idx, "up_proj": idx}
    elif hasattr(host, "gate_up_proj"):  # Phi-3: [gate; up] in one linear
        row_cut = {"gate_up_proj": torch.cat([idx, idx + host.down_proj.in_features])}
    else:
        row_cut = {"fc1": idx}
    saved = {}
    for name, rows in row_cut.items():
        saved[name] = getattr(host, name)
        setattr(host, name, _linear(saved[name].weight[rows], _maybe(saved[name].bias, rows)))
    saved[down] = getattr(host, down)
    setattr(host, down, _linear(saved[down].weight[:, idx], saved[down].bias))
    return saved


def _maybe(bias, rows):
    return None if bias is None else bias[rows]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    lin.weight.data.copy_(weight)
    if bias is not None:
        lin.bias.data.copy_(bias)
    return lin


@torch.no_grad()
def dense_generate(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


# -- beyond the paper: per-token experts in a pool (`gated`) and refreshes -------------------


def gated_sizes(density: float, width: int) -> tuple[int, int]:
    """``gated`` at ``density``: a pool of 1.5x the topk budget B = floor(density * D) (at most D)
    and k experts per token with pool + 2k <= 3B: gate rows for the pool, up/down rows for k."""
    budget = int(width * density)
    if budget >= width:
        return width, width
    pool = min(width, int(1.5 * budget))
    return pool, max(0, min(pool, (3 * budget - pool) // 2))


@torch.no_grad()
def griffin_generate_variant(model, prompt_ids: list[int], density: float, max_new_tokens: int, *,
                             method: str = "topk", refresh: int = 0, loop_guard: int = 0,
                             forced: list[int] | None = None) -> OracleResult:
    """``topk`` or ``gated`` decode, optionally with refreshes, for gate/up MLPs (Llama, Qwen2, Gemma).

    * ``gated``: the statistic's top-``pool`` neurons are the sequence's pool; each decode
      token computes act(gate) on the pool, keeps the k of largest |act(gate)|, and runs
      up and down for those only.
    * ``refresh = R``: generated token g (g = 1, 2, ...; g = 0 is the first decode step)
      with g % R == 0 runs the full MLP; its contribution z^2/||z||^2, times R, joins the
      summed statistic, and the experts (pool) are the new top-k from the next token on.
    * ``loop_guard = n``: generated token g also runs dense and refreshes when the n tokens
      ending with it (g-n+1 .. g) already ended an earlier position of the output. Every
      refresh's contribution counts as many times as tokens were generated since the last
      one (R on the fixed schedule alone).
    * ``forced``: feed these tokens instead of the greedy ones (teacher forcing) and record
      each one's regret. ``gated`` ranks thousands of float32 gates per token, so near-ties
      at its top-k boundary are in nearly every token, and either side changes the logits a
      little: an engine's own greedy text is checked token by token this way.
    """
    layers = decoder_layers(model)
    mlps = [layer.mlp for layer in layers]
    captured: dict[int, torch.Tensor] = {}
    hooks = [m.down_proj.register_forward_pre_hook(
        lambda mod, args, i=i: captured.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]).clone()))
        for i, m in enumerate(mlps)]
    try:
        out = model(torch.tensor([prompt_ids]), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    width = mlps[0].down_proj.in_features
    if method == "gated":
        top, k = gated_sizes(density, width)
    else:
        top, k = int(width * density), None
    sums = [statistic_from_activations(captured[i]).square() for i in range(len(layers))]
    pools = [torch.topk(s, top).indices.sort().values for s in sums]
    first_pools = [p.clone() for p in pools]
    dense_now = [False]
    weight = [0]
    last_refresh = 0
    seen: dict[tuple[int, ...], int] = {}  # n-gram of the output -> the first index it ended at
    margins, selection_tie, regrets = [], None, []

    def take(logits: torch.Tensor, index: int) -> int:
        margins.append(_margin(logits))
        token = int(logits.argmax()) if forced is None else forced[index]
        regrets.append(float(logits.max() - logits[token]))
        return token

    def forward_for(i, mlp):
        def forward(x):
            flat = x.reshape(-1, x.shape[-1])
            if dense_now[0]:
                z = mlp.act_fn(mlp.gate_proj(flat)) * mlp.up_proj(flat)
                sums[i] = sums[i] + weight[0] * statistic_from_activations(z).square()
                return mlp.down_proj(z).reshape(x.shape)
            pool = pools[i]
            gate = mlp.act_fn(flat @ mlp.gate_proj.weight[pool].t())
            if k is None:
                idx = pool.expand(flat.shape[0], -1)
            else:
                sel = torch.topk(gate.abs(), k, dim=-1).indices
                gate = gate.gather(-1, sel)
                idx = pool[sel]
            up = torch.einsum("th,tkh->tk", flat, mlp.up_proj.weight[idx])
            out = torch.einsum("tk,tkh->th", gate * up, mlp.down_proj.weight.t()[idx])
            return out.reshape(x.shape)
        return forward

    originals = [m.forward for m in mlps]
    for i, m in enumerate(mlps):
        m.forward = forward_for(i, m)
    try:
        tokens = [take(out.logits[0, -1], 0)]
        past = out.past_key_values
        while len(tokens) < max_new_tokens:
            generated = len(tokens) - 1  # the token fed now
            looping = False
            if loop_guard and generated >= loop_guard - 1:
                gram = tuple(tokens[generated - loop_guard + 1: generated + 1])
                looping = seen.setdefault(gram, generated) < generated
            dense_now[0] = generated > 0 and (bool(refresh) and generated % refresh == 0 or looping)
            if dense_now[0]:
                weight[0], last_refresh = generated - last_refresh, generated
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            if dense_now[0]:
                pools[:] = [torch.topk(s, top).indices.sort().values for s in sums]
                # The next forward (token index len(tokens) + 1 on) reads the new pools.
                if selection_tie is None and top < width and any(_boundary_gap(s, top) < 1e-5 for s in sums):
                    selection_tie = len(tokens) + 1
            tokens.append(take(out.logits[0, -1], len(tokens)))
    finally:
        for m, f in zip(mlps, originals):
            m.forward = f
    return OracleResult(tokens=tokens, experts=first_pools, statistic=[s.sqrt() for s in sums], margins=margins,
                        selection_tie=selection_tie, regrets=regrets)


def _boundary_gap(stat_sum: torch.Tensor, k: int) -> float:
    """Relative gap between the k-th and (k+1)-th largest statistic (a near-tie: float32 may swap them)."""
    top = torch.topk(stat_sum, k + 1).values
    return float((top[k - 1] - top[k]) / top[k - 1].clamp_min(1e-300))


def _margin(logits: torch.Tensor) -> float:
    top = logits.float().topk(2).values
    return float(top[0] - top[1])
