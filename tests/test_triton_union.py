"""The union-tiled Triton decode kernel against the plain-torch reference (the oracle),
on CPU under TRITON_INTERPRET=1, and the dispatch decision that would pick it on a GPU."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_griffin.ops import choose_path, kernel_can_win
from vllm_griffin.ops.dispatch import CPU_COST, GPU_COST

ROOT = Path(__file__).resolve().parents[1]

# Runs in a subprocess: TRITON_INTERPRET must be set before triton is imported, and the
# rest of the test session imports triton without it. Prints one JSON object of
# {case name: measured value}; the tests below judge each value.
INTERPRETER_CHECKS = r"""
import json, torch
from tests.test_kernels import act_and_mul
from vllm_griffin.ops.reference import ExpertWeights, experts_mlp_gather
from vllm_griffin.ops.triton_experts import experts_mlp_triton_union, union_membership, union_neurons

def expert_table(rows, width, counts, sets, gen):
    # [T, kmax]: each row's experts first, then table padding (real neurons past the count).
    kmax = max(counts)
    if sets == "random":      # independent random sets
        return torch.stack([torch.randperm(width, generator=gen)[:kmax] for _ in range(rows)])
    if sets == "overlap":     # every row takes a prefix of one shared order: heavy overlap
        order = torch.randperm(width, generator=gen)
        return torch.stack([order[:kmax][torch.randperm(kmax, generator=gen)] for _ in range(rows)])
    if sets == "disjoint":    # rows own separate slices of the neurons (needs rows * kmax <= width)
        order = torch.randperm(width, generator=gen)
        return torch.stack([order[t * kmax:(t + 1) * kmax] for t in range(rows)])
    raise ValueError(sets)

def make(rows, hidden, width, counts, sets, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    w_gate_up = (torch.randn(2 * width, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    w_down_t = (torch.randn(width, hidden, generator=gen) / width ** 0.5).to(dtype)
    return x, ExpertWeights.separate(w_gate_up, w_down_t), expert_table(rows, width, counts, sets, gen), torch.tensor(counts)

def reference(x, w, experts, counts, act):
    # fp64 from the very same (possibly bf16) numbers the kernel reads.
    w64 = ExpertWeights(w.gate.double(), w.up.double(), w.down_t.double())
    return experts_mlp_gather(x.double(), w64, experts, counts, act_and_mul(act))

def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()

SHAPES = {  # name: rows, hidden, width, counts (a row with 0, odd k), expert sets
    "random_2rows": (2, 64, 96, [48, 47], "random"),
    "random_mixed_counts": (4, 100, 80, [40, 0, 37, 1], "random"),
    "overlap": (5, 40, 33, [33, 1, 17, 32, 5], "overlap"),
    "disjoint": (3, 48, 96, [30, 29, 31], "disjoint"),
    "one_row": (1, 72, 50, [25], "random"),
}
out = {}
for name, (rows, hidden, width, counts, sets) in SHAPES.items():
    for dtype in (torch.float32, torch.bfloat16):
        for act in ("silu", "gelu_tanh"):
            x, w, experts, counts_t = make(rows, hidden, width, counts, sets, dtype)
            want = reference(x, w, experts, counts_t, act)
            for split_h, split_u in ((1, 1), (3, 2)):
                got = experts_mlp_triton_union(x, w, experts, counts_t, act, block_u=16, block_h=32,
                                               split_h=split_h, split_u=split_u)
                assert got.dtype == dtype and got.shape == want.shape
                out[f"{name}-{str(dtype)[6:]}-{act}-split{split_h}{split_u}"] = rel_err(got, want)

# The two other activations, and the rows' own masks given instead of the expert table.
x, w, experts, counts_t = make(4, 100, 80, [40, 0, 37, 1], "random", torch.float32, seed=1)
for act in ("gelu", "relu"):
    got = experts_mlp_triton_union(x, w, experts, counts_t, act, block_u=16, block_h=32)
    out[f"random_mixed_counts-float32-{act}-split11"] = rel_err(got, reference(x, w, experts, counts_t, act))
masks = union_membership(experts, counts_t, 80).bool()
got = experts_mlp_triton_union(x, w, experts, counts_t, "silu", masks=masks, block_u=16, block_h=32)
out["masks_given-float32-silu"] = rel_err(got, reference(x, w, experts, counts_t, "silu"))
# int32 expert tables (the CUDA-graph buffers' dtype) and int32 counts.
got = experts_mlp_triton_union(x, w, experts.int(), counts_t.int(), "silu", block_u=16, block_h=32)
out["int32_table-float32-silu"] = rel_err(got, reference(x, w, experts, counts_t, "silu"))

# More rows than one launch takes (they run in chunks of 64).
counts = [(7 * t) % 40 for t in range(70)]
x, w, experts, counts_t = make(70, 32, 40, counts, "random", torch.float32, seed=2)
got = experts_mlp_triton_union(x, w, experts, counts_t, "silu", block_u=16, block_h=32)
out["chunked_70rows-float32-silu"] = rel_err(got, reference(x, w, experts, counts_t, "silu"))

# Each row's result is its own: the same row alone gives the same numbers (fp order aside).
x, w, experts, counts_t = make(4, 100, 80, [40, 0, 37, 1], "random", torch.float32, seed=3)
batch = experts_mlp_triton_union(x, w, experts, counts_t, "silu", block_u=16, block_h=32)
alone = torch.cat([experts_mlp_triton_union(x[t:t + 1], w, experts[t:t + 1], counts_t[t:t + 1], "silu",
                                            block_u=16, block_h=32) for t in range(4)])
out["row_alone_vs_batch"] = (batch - alone).abs().max().item() / batch.abs().max().item()

# Only union neurons are read: poison every other neuron's weights with NaN.
member = union_membership(experts, counts_t, 80)
unused = member.amax(0) == 0
poisoned = ExpertWeights(w.gate.clone(), w.up.clone(), w.down_t.clone())
for m in (poisoned.gate, poisoned.up, poisoned.down_t):
    m[unused] = float("nan")
got = experts_mlp_triton_union(x, poisoned, experts, counts_t, "silu", block_u=16, block_h=32, split_h=3, split_u=2)
out["unused_neurons_poisoned"] = rel_err(got, reference(x, w, experts, counts_t, "silu"))
out["poisoned_neurons"] = int(unused.sum())

# The device-side union list is the sorted set of used neurons.
union, n_union = union_neurons(member)
n = int(n_union)
out["union_list_exact"] = bool(torch.equal(union[:n].long(), member.amax(0).nonzero().flatten()))
out["union_size"] = n
empty, n_empty = union_neurons(torch.zeros(3, 80, dtype=torch.uint8))
out["empty_union_size"] = int(n_empty)

# No row has an expert: exact zeros.
x, w, experts, counts_t = make(3, 48, 90, [0, 0, 0], "random", torch.float32)
experts = torch.zeros(3, 5, dtype=torch.long)
out["all_counts_zero_max_abs"] = experts_mlp_triton_union(x, w, experts, counts_t, "silu").abs().max().item()
print("RESULTS" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_CHECKS], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULTS")[-1])


def test_union_kernel_matches_reference_for_every_case(interpreter_results):
    errors = {k: v for k, v in interpreter_results.items() if "-" in k}
    assert len(errors) == 5 * 2 * 2 * 2 + 2 + 1 + 1 + 1  # every case ran
    # fp32: fp32 dots ("ieee"); bf16: h and the output are rounded to bf16, as in vLLM's dense MLP.
    too_far = {k: v for k, v in errors.items() if not v < (2e-2 if "bfloat16" in k else 1e-5)}
    assert not too_far, too_far


def test_union_kernel_rows_are_independent(interpreter_results):
    assert interpreter_results["row_alone_vs_batch"] < 1e-5


def test_union_kernel_reads_only_union_neurons(interpreter_results):
    assert interpreter_results["poisoned_neurons"] > 0  # the poison is really there
    assert interpreter_results["unused_neurons_poisoned"] < 1e-5


def test_union_list_on_the_device(interpreter_results):
    assert interpreter_results["union_list_exact"]
    assert 0 < interpreter_results["union_size"] < 80
    assert interpreter_results["empty_union_size"] == 0
    assert interpreter_results["all_counts_zero_max_abs"] == 0.0


def test_dispatch_picks_union_kernel_only_with_union_constants():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    D, k = 14336, 7168  # Llama-3-8B MLP width, d = 0.5
    # Hypothetical constants of the kind benchmarks/gpu_kernels.py fits (not measured).
    with_union = dataclasses.replace(GPU_COST, union_stream=1.0, union_overhead=4000.0)
    # Heavily overlapping sets (union 8000 of 14336): the union kernel reads 8000 neurons once,
    # the per-row kernel 4 x 7168, dense 14336.
    assert choose_path(cuda, True, 4, D, 8000, 4 * k, cost=with_union) == "triton_union"
    # One row has nothing to share: the per-row kernel.
    assert choose_path(cuda, True, 1, D, k, k, cost=with_union) == "triton"
    # Independent sets cover nearly every neuron: dense wins.
    assert choose_path(cuda, True, 4, D, D, 4 * k, cost=with_union) == "masked"
    assert kernel_can_win(cuda, 4, D, k, 4 * k, cost=with_union)
    # Without union constants (the shipped GPU_COST, no H200 timing yet) it is never chosen.
    assert GPU_COST.union_stream is None
    assert choose_path(cuda, True, 4, D, 8000, 4 * k) == "masked"
    assert not kernel_can_win(cuda, 4, D, k, 4 * k)
    # The CPU's union path keeps its own name (the C kernel), unchanged.
    assert choose_path(cpu, True, 64, 8192, 2048, 64 * 2048, cost=CPU_COST) == "union"


def test_gpu_benchmark_helpers_on_cpu():
    """The H200 script's non-CUDA parts: its expert sets overlap as documented, and its
    fit recovers known CostModel constants from synthetic timings."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_kernels
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    gen, D, k = torch.Generator().manual_seed(0), 4096, 2048

    def mean_jaccard(sets):
        pairs = [(set(a.tolist()), set(b.tolist())) for a, b in zip(sets[:-1], sets[1:])]
        return sum(len(a & b) / len(a | b) for a, b in pairs) / len(pairs)

    random_sets = gpu_kernels.expert_sets(8, D, k, "random", gen, "cpu")
    overlap_sets = gpu_kernels.expert_sets(8, D, k, "overlap", gen, "cpu")
    assert random_sets.shape == overlap_sets.shape == (8, k)
    assert all(torch.unique(row).numel() == k for row in overlap_sets)  # distinct experts per row
    assert 0.28 < mean_jaccard(random_sets) < 0.38      # independent halves: ~1/3
    assert 0.65 < mean_jaccard(overlap_sets) < 0.78     # shared pool of 1.2 k: ~0.7
    with pytest.raises(ValueError, match="kind='x' is invalid; allowed: random, overlap"):
        gpu_kernels.expert_sets(2, D, k, "x", gen, "cpu")

    # Synthetic timings from known constants (unit 0.01 us per neuron): 30 us overhead,
    # 0.9 units per union neuron, and a compute floor that only binds at 64 rows.
    unit, overhead, stream, compute = 0.01, 30.0, 0.9 * 0.01, 0.0004
    cases = [{"rows": r, "union": u, "products": r * k,
              "union_us": overhead + max(stream * u, compute * r * k)}
             for r, u in ((2, 3000), (4, 3500), (8, 4000), (16, 4096), (64, 4096))]
    fit = gpu_kernels.fit_union_cost(cases, unit)
    assert fit["union_overhead"] == pytest.approx(overhead / unit, rel=1e-6)
    assert fit["union_stream"] == pytest.approx(0.9, rel=1e-6)
    assert fit["union_compute"] == pytest.approx(compute / unit, rel=1e-6)
    assert all(c["union_predicted_us"] == pytest.approx(c["union_us"]) for c in cases)


def test_union_kernel_refuses_what_it_cannot_run():
    from vllm_griffin.ops.reference import ExpertWeights
    from vllm_griffin.ops.triton_experts import experts_mlp_triton_union

    x, experts, counts = torch.zeros(2, 8), torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 1])
    gated = ExpertWeights.separate(torch.zeros(2 * 6, 8), torch.zeros(6, 8))
    with pytest.raises(ValueError, match="activation='tanh' is invalid; allowed: silu, gelu_tanh, relu, gelu"):
        experts_mlp_triton_union(x, gated, experts, counts, "tanh")
    with_bias = ExpertWeights.separate(torch.zeros(2 * 6, 8), torch.zeros(6, 8), b_down=torch.zeros(8))
    with pytest.raises(ValueError, match="gated MLPs without biases"):
        experts_mlp_triton_union(x, with_bias, experts, counts, "silu")


def test_kernels_compile_for_the_h200(tmp_path):
    """Compile every kernel of the module for sm_90 (H200) ahead of time, no GPU needed:
    the interpreter does not run Triton's compiler, so type and layout errors that only
    the real compile finds (tl.dot shapes, loop-carried types) are caught here."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vllm_griffin.ops import triton_experts as te

    def compile_for_h200(kernel, pointers: dict, constexprs: dict, num_warps: int = 4):
        names = list(inspect.signature(kernel.fn).parameters)
        signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(names.index(n),): v for n, v in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert compiled.asm["cubin"], kernel.fn.__name__
        return compiled

    def spilled_bytes(compiled) -> int:
        # ptxas -v on the PTX, with the ptxas Triton itself uses for sm_90.
        from triton.backends.nvidia.compiler import get_ptxas

        ptx = tmp_path / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
        spills = re.findall(r"(\d+) bytes spill stores", log)
        assert spills, log
        return sum(int(n) for n in spills)

    bf16, fp32 = "*bf16", "*fp32"
    index = {"union_ptr": "*i32", "n_ptr": "*i32", "member_ptr": "*u8"}
    # The union kernels at their defaults (64 x 64 tiles, 8 warps): they compile and keep
    # everything in registers, for one row (BLOCK_T 16) up to 64 rows.
    for split, block_t in ((1, 16), (4, 64)):  # h finished in place / partials; few rows / 64 rows
        partial = bf16 if split == 1 else fp32
        gate_up = compile_for_h200(te._union_gate_up_kernel,
                                   {"x_ptr": bf16, "gate_ptr": bf16, "up_ptr": bf16, "g_ptr": partial,
                                    "u_ptr": partial, "h_ptr": bf16, **index},
                                   {"ACT": 0, "SPLIT_H": split, "DOT_FP32": False, "BLOCK_T": block_t,
                                    "BLOCK_U": 64, "BLOCK_H": 64}, num_warps=8)
        down = compile_for_h200(te._union_down_kernel, {"h_ptr": bf16, "w_ptr": bf16, "out_ptr": fp32, **index},
                                {"SPLIT_U": split, "DOT_FP32": False, "BLOCK_T": block_t, "BLOCK_U": 64,
                                 "BLOCK_H": 64}, num_warps=8)
        assert spilled_bytes(gate_up) == 0 and spilled_bytes(down) == 0, block_t
    compile_for_h200(te._union_act_mul_kernel, {"g_ptr": fp32, "u_ptr": fp32, "h_ptr": bf16, **index},
                     {"ACT": 1, "SPLIT_H": 4, "BLOCK_T": 16, "BLOCK_U": 64})
    compile_for_h200(te._compact_kernel, {"used_ptr": "*u8", "union_ptr": "*i32", "n_ptr": "*i32"},
                     {"BLOCK": 16384}, num_warps=16)
    # The per-row kernels of the same module.
    rows_index = {"experts_ptr": "*i64", "counts_ptr": "*i32"}
    compile_for_h200(te._gate_up_kernel, {"x_ptr": bf16, "gate_ptr": bf16, "up_ptr": bf16, "g_ptr": fp32,
                                          "u_ptr": fp32, **rows_index},
                     {"SPLIT_H": 4, "BLOCK_K": 128, "BLOCK_H": 64})
    compile_for_h200(te._act_mul_kernel, {"g_ptr": fp32, "u_ptr": fp32, "h_ptr": fp32, "counts_ptr": "*i32"},
                     {"ACT": 0, "SPLIT_H": 4, "BLOCK_K": 256})
    compile_for_h200(te._down_kernel, {"h_ptr": fp32, "w_ptr": bf16, "out_ptr": fp32, **rows_index},
                     {"SPLIT_K": 4, "BLOCK_K": 128, "BLOCK_H": 64})
