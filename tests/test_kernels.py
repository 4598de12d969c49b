"""Decode kernels against the plain-torch reference (the oracle for kernels)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vllm_griffin.ops import ExpertWeights, choose_path, experts_mlp_gather, union_size
from vllm_griffin.ops.cpu_kernel import experts_mlp_cpu, load

ROOT = Path(__file__).resolve().parents[1]
ACTS = {
    "silu": lambda g: F.silu(g),
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "gelu": lambda g: F.gelu(g),
    "relu": lambda g: F.relu(g),
}


def act_and_mul(name):
    def fn(x):
        d = x.shape[-1] // 2
        return ACTS[name](x[..., :d]) * x[..., d:]
    return fn


def case(rows, hidden, width, counts, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen)
    w_gate_up = (torch.randn(2 * width, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    w_down_t = (torch.randn(width, hidden, generator=gen) / width ** 0.5).to(dtype)
    kmax = max(counts)
    experts = torch.stack([torch.randperm(width, generator=gen)[:kmax].sort().values for _ in range(rows)])
    return x, w_gate_up, w_down_t, experts, torch.tensor(counts)


def test_cpu_kernel_builds():
    assert load() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", sorted(ACTS))
@pytest.mark.parametrize("rows, hidden, width, counts", [
    (1, 64, 96, [48]), (4, 100, 80, [40, 0, 37, 1]), (7, 72, 50, [25] * 7), (3, 13, 10, [9, 10, 3]),
])
def test_cpu_kernel_matches_reference_and_orders_agree_bitwise(dtype, activation, rows, hidden, width, counts):
    x, wgu, wdt, experts, counts = case(rows, hidden, width, counts, dtype)
    want = experts_mlp_gather(x.double(), ExpertWeights.separate(wgu.double(), wdt.double()), experts, counts,
                              act_and_mul(activation))
    # Both weight layouts the kernels accept: separate matrices and one interleaved block.
    separate = ExpertWeights.separate(wgu, wdt)
    interleaved = ExpertWeights.interleaved(wgu, wdt.t().contiguous())
    by_rows = experts_mlp_cpu(x, separate, experts, counts, activation, "rows")
    by_union = experts_mlp_cpu(x, interleaved, experts, counts, activation, "union")
    assert torch.allclose(by_rows.double(), want, atol=1e-4, rtol=1e-4)
    # Both loop orders add each row's experts in the same order: identical bits,
    # so a row's result does not depend on the batch it is in.
    assert torch.equal(by_rows, by_union)
    alone = torch.cat([experts_mlp_cpu(x[t:t + 1], interleaved, experts[t:t + 1], counts[t:t + 1], activation,
                                       "union") for t in range(rows)])
    assert torch.equal(alone, by_union)


def test_union_size_and_dispatch():
    experts = torch.tensor([[0, 1, 2, 9], [1, 2, 3, 9]])
    assert union_size(experts, torch.tensor([3, 3]), 10) == 4  # 9 is past both counts
    assert union_size(experts[:1], torch.tensor([2]), 10) == 2
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # The 1B Llama shape on this CPU (benchmarks/results/cpu_kernels_union_tiled.json), D = 8192:
    assert choose_path(cpu, True, 1, 8192, 4096, 4096) == "rows"              # 2.2x dense
    assert choose_path(cpu, True, 2, 8192, 6144, 8192) == "union"             # 1.66x (rows 1.16x)
    assert choose_path(cpu, True, 4, 8192, 6600, 4 * 4096) == "union"         # 1.38x
    assert choose_path(cpu, True, 64, 8192, 2048, 64 * 2048) == "union"       # heavy overlap
    assert choose_path(cpu, True, 8, 8192, 8000, 8 * 4096) == "masked"        # almost no overlap: ~1.1x, too close
    assert choose_path(cpu, True, 64, 8192, 8192, 64 * 6144) == "masked"
    # SmolLM2 (D = 1536) at 32 rows: the union kernel loses (0.95-0.98x): dense GEMM.
    assert choose_path(cpu, True, 32, 1536, 1536, 32 * 768) == "masked"
    assert choose_path(cpu, False, 1, 8192, 4096, 4096) == "gather"
    # H200 (benchmarks/results/h200_triton_experts.json), D = 14336:
    assert choose_path(cuda, True, 1, 14336, 7168, 7168) == "triton"          # 1.47x
    assert choose_path(cuda, True, 4, 14336, 14336, 4 * 7168) == "masked"     # 0.64x
    # A step whose dense rows (refresh tokens, prompt chunks) stream the weights anyway: the
    # masked path shares their pass and costs only its rows' arithmetic, so what wins alone
    # (union at 4 rows on the 1B shape, rows at 1) no longer does.
    assert choose_path(cpu, True, 4, 8192, 6600, 4 * 4096, dense_rows=1) == "masked"
    assert choose_path(cpu, True, 1, 8192, 4096, 4096, dense_rows=2) == "masked"
    assert choose_path(cpu, True, 4, 8192, 6600, 4 * 4096, dense_rows=0) == "union"


TRITON_CHECK = r"""
import torch, torch.nn.functional as F
from tests.test_kernels import case, act_and_mul
from vllm_griffin.ops.reference import ExpertWeights, experts_mlp_gather
from vllm_griffin.ops.triton_experts import experts_mlp_triton
worst = 0.0
for rows, hidden, width, counts in [(1, 64, 96, [48]), (3, 100, 80, [40, 0, 37]), (5, 40, 33, [33, 1, 17, 32, 5])]:
    for act in ("silu", "gelu_tanh", "gelu", "relu"):
        for split in (1, 3):
            x, wgu, wdt, experts, counts_t = case(rows, hidden, width, counts, torch.float32)
            for weights in (ExpertWeights.separate(wgu, wdt), ExpertWeights.interleaved(wgu, wdt.t().contiguous())):
                want = experts_mlp_gather(x, weights, experts, counts_t, act_and_mul(act))
                got = experts_mlp_triton(x, weights, experts, counts_t, act, block_k=16, block_h=32, split_k=split,
                                         split_h=split)
                err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
                worst = max(worst, err)
print("WORST", worst)
"""


def test_triton_kernels_match_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.split("WORST")[-1])
    assert worst < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, width, slots", [(1, 13, 3), (5, 1536, 4), (16, 1000, 7), (64, 8192, 64)])
def test_keep_rows_kernel_matches_reference(dtype, rows, width, slots):
    """The masked path's zeroing: row t keeps masks[slot[t]]'s neurons, the rest become 0."""
    from vllm_griffin.ops.cpu_kernel import keep_rows_cpu
    from vllm_griffin.ops.reference import keep_rows_reference

    gen = torch.Generator().manual_seed(rows * width)
    masks = torch.rand(slots, width, generator=gen) < 0.4
    slot = torch.randint(0, slots, (rows,), generator=gen)  # repeats allowed (several tokens of one request)
    # z as a strided view (rows of a wider buffer), like an activation's output slice.
    wide = torch.randn(rows, width + 5, generator=gen).to(dtype)
    z = wide[:, 2:2 + width]
    want = keep_rows_reference(z.clone(), masks, slot)
    got = keep_rows_cpu(z, masks, slot)
    assert got.data_ptr() == z.data_ptr() and torch.equal(got, want)
    assert ((got != 0) == (masks[slot] & (want != 0))).all() and (got[~masks[slot]] == 0).all()


def test_keep_rows_kernel_leaves_other_columns_and_rejects_bad_input():
    from vllm_griffin.ops.cpu_kernel import keep_rows_cpu

    masks = torch.tensor([[True, False, True], [False, True, False]])
    wide = torch.arange(1.0, 11.0).reshape(2, 5)
    keep_rows_cpu(wide[:, 1:4], masks, torch.tensor([1, 0]))
    assert wide.tolist() == [[1.0, 0.0, 3.0, 0.0, 5.0], [6.0, 7.0, 0.0, 9.0, 10.0]]
    with pytest.raises(ValueError, match=r"slots\[1\] = 2; allowed: 0..1"):
        keep_rows_cpu(torch.ones(2, 3), masks, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="slots has 1 entries; expected 2"):
        keep_rows_cpu(torch.ones(2, 3), masks, torch.tensor([0]))
    with pytest.raises(ValueError, match="masks must be bool"):
        keep_rows_cpu(torch.ones(2, 3), masks.float(), torch.tensor([0, 1]))


def gated_case(rows, width, dtype, seed, extra=5):
    """gate_up [rows, 2 * width] as a strided view (rows of a wider buffer, like vLLM's
    output slices), values up to about +-12 so the activation's both tails are used."""
    gen = torch.Generator().manual_seed(seed)
    wide = (torch.randn(rows, 2 * width + extra, generator=gen) * 4).to(dtype)
    return wide[:, 2:2 + 2 * width]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows, width, slots", [(1, 13, 3), (5, 1536, 4), (16, 1000, 7), (64, 8192, 64)])
def test_fused_masked_activation_matches_reference(dtype, activation, rows, width, slots):
    """The masked path fused on a CPU: z = act(gate) * up on each row's experts, exactly 0
    elsewhere; within float32 rounding of torch's activation (bfloat16: one rounding)."""
    from vllm_griffin.ops.cpu_kernel import act_keep_cpu
    from vllm_griffin.ops.reference import act_keep_reference

    gate_up = gated_case(rows, width, dtype, seed=rows * width)
    gen = torch.Generator().manual_seed(width)
    masks = torch.rand(slots, width, generator=gen) < 0.4
    slot = torch.randint(0, slots, (rows,), generator=gen)  # repeats allowed
    got = act_keep_cpu(gate_up, masks, slot, activation)
    # The oracle in float32 from the same inputs, rounded once to the output dtype.
    want = act_keep_reference(gate_up.float(), masks, slot, act_and_mul(activation))
    assert got.dtype == dtype and got.shape == (rows, width) and got.is_contiguous()
    assert (got[~masks[slot]] == 0).all() and not got[~masks[slot]].signbit().any()
    # torch's GELU tanh form, 0.5 g (1 + tanh), loses its digits as 1 + tanh -> 0 (g < -4),
    # where the kernel's g * sigmoid form keeps them: an absolute 2e-6 apart at most there.
    atol = 1e-6 if activation == "silu" else 1e-5
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=atol)
    else:
        torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=2 ** -7, atol=atol)
        big = want.abs() > 1e-3  # away from the GELU tail above: almost all bit-equal
        assert (got[big] == want.to(dtype)[big]).float().mean() > 0.99


def test_fused_masked_activation_bits_do_not_depend_on_the_column():
    """A value computed in the kernel's 8-lane loop and in its scalar tail gets the same bits."""
    from vllm_griffin.ops.cpu_kernel import act_keep_cpu

    gen = torch.Generator().manual_seed(3)
    gate, up = torch.randn(7, generator=gen) * 6, torch.randn(7, generator=gen)
    edge = torch.tensor([-100.0, -88.0, -30.0, 0.0, 1e-30, 30.0, 90.0])
    for g in (gate, edge):
        for activation in ("silu", "gelu_tanh"):
            tail = act_keep_cpu(torch.cat([g, up]).unsqueeze(0), torch.ones(1, 7, dtype=torch.bool),
                                torch.tensor([0]), activation)  # width 7: every column in the tail
            padded = torch.cat([g, g[:1], up, up[:1]]).unsqueeze(0)  # width 8: every column in lanes
            lanes = act_keep_cpu(padded, torch.ones(1, 8, dtype=torch.bool), torch.tensor([0]), activation)
            assert torch.equal(tail[0], lanes[0, :7])
    # Extremes stay finite and close to the exact values; NaN stays NaN.
    z = act_keep_cpu(torch.cat([edge, torch.ones(7)]).unsqueeze(0), torch.ones(1, 7, dtype=torch.bool),
                     torch.tensor([0]), "silu")
    torch.testing.assert_close(z[0], F.silu(edge), rtol=2e-6, atol=1e-30)
    nan = act_keep_cpu(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 1, dtype=torch.bool),
                       torch.tensor([0]), "silu")
    assert nan.isnan().all()


def test_masked_activation_entry_point_and_bad_input():
    from vllm_griffin.ops import dispatch, masked_activation_fn
    from vllm_griffin.ops.cpu_kernel import act_keep_cpu, keep_rows_cpu

    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(5)
    masks, slots = torch.rand(6, 300, generator=gen) < 0.5, torch.tensor([5, 0, 5])
    for dtype in (torch.float32, torch.bfloat16):
        gate_up = gated_case(3, 300, dtype, seed=1)
        # SiLU: the fused kernel (its unchecked call: the same bits as the checked one).
        fused = masked_activation_fn(cpu, dtype, "silu", act_and_mul("silu"))
        assert torch.equal(fused(gate_up, masks, slots), act_keep_cpu(gate_up, masks, slots, "silu"))
        with pytest.raises(ValueError, match="unit column stride"):
            fused(torch.zeros(600, 3, dtype=dtype).t(), masks, slots)
        # Exact GELU is not fused: the model's own activation, then the C zeroing.
        unfused = masked_activation_fn(cpu, dtype, "gelu", act_and_mul("gelu"))
        want = keep_rows_cpu(act_and_mul("gelu")(gate_up), masks, slots)
        assert torch.equal(unfused(gate_up, masks, slots), want)
    # float16 (no kernel) takes the torch reference through the same entry point.
    gate_up = gated_case(3, 300, torch.float16, seed=1)
    slow = masked_activation_fn(cpu, torch.float16, "silu", act_and_mul("silu"))
    assert torch.equal(slow(gate_up, masks, slots),
                       dispatch.keep_rows_reference(act_and_mul("silu")(gate_up), masks, slots))
    with pytest.raises(ValueError, match="activation 'gelu' is not fused; allowed: silu, gelu_tanh"):
        act_keep_cpu(torch.ones(2, 6), masks[:, :3], torch.tensor([0, 1]), "gelu")
    with pytest.raises(ValueError, match=r"gate_up must be .* \[rows, 2 \* neurons\]"):
        act_keep_cpu(torch.ones(2, 5), masks[:, :3], torch.tensor([0, 1]), "silu")
    with pytest.raises(ValueError, match=r"masks must be bool \[slots, 3\]"):
        act_keep_cpu(torch.ones(2, 6), masks[:, :4], torch.tensor([0, 1]), "silu")
    with pytest.raises(ValueError, match=r"slots\[0\] = 6; allowed: 0..5"):
        act_keep_cpu(torch.ones(2, 6), masks[:, :3], torch.tensor([6, 1]), "silu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", sorted(ACTS))
@pytest.mark.parametrize("rows, hidden, width, pool_size, k", [(1, 64, 96, 72, 20), (3, 40, 50, 50, 12),
                                                              (6, 19, 70, 33, 9)])
def test_gated_experts_cpu_matches_reference(activation, dtype, rows, hidden, width, pool_size, k):
    """`gated` decode kernel: equals the dense masked reference; the pool is respected and k
    experts run per row (not the whole pool); both loop orders give the same bits, which are
    the expert kernel's on the experts it chose; a row with k = 0 (another method's row in
    the same step) runs its whole pool."""
    from vllm_griffin.core.algorithm import token_experts
    from vllm_griffin.ops.cpu_kernel import gated_experts_cpu
    from vllm_griffin.ops.reference import gated_experts_reference

    gen = torch.Generator().manual_seed(rows)
    x, wgu, wdt, _, _ = case(rows, hidden, width, [1], dtype)
    pool = torch.zeros(rows, width, dtype=torch.bool)
    for t in range(rows):
        pool[t, torch.randperm(width, generator=gen)[:pool_size]] = True
    experts = pool.nonzero()[:, 1].view(rows, pool_size)
    counts = torch.full((rows,), pool_size)
    ks = torch.full((rows,), k)
    weights = ExpertWeights.interleaved(wgu, wdt.t().contiguous())
    exact = ExpertWeights.separate(wgu.double(), wdt.double())
    want = gated_experts_reference(x.double(), exact, pool, k, act_and_mul(activation))
    got = gated_experts_cpu(x, weights, experts, counts, ks, activation, "rows")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.double(), want, atol=tol, rtol=tol)
    assert torch.equal(gated_experts_cpu(x, weights, experts, counts, ks, activation, "union"), got)
    # The same bits as the expert kernel on the k it chose (gates in float32, as the kernel).
    gate = x.float() @ wgu[:width].float().t()
    chosen = token_experts(ACTS[activation](gate), pool, k)
    assert torch.equal(chosen.sum(-1), ks)
    same = experts_mlp_cpu(x, weights, chosen.nonzero()[:, 1].view(rows, k), ks, activation, "rows")
    assert torch.equal(got, same)
    # The pool's whole width (topk's experts) gives another answer: k of them ran.
    whole = gated_experts_reference(x.double(), exact, pool, pool_size, act_and_mul(activation))
    assert not torch.allclose(whole, want, atol=1e-3)
    # Rows of another method (k = 0) run the whole pool, beside gated rows.
    ks[0] = 0
    mixed = gated_experts_cpu(x, weights, experts, counts, ks, activation, "union")
    assert torch.equal(mixed[0], experts_mlp_cpu(x[:1], weights, experts[:1], counts[:1], activation, "rows")[0])
    assert torch.equal(mixed[1:], got[1:])
    with pytest.raises(ValueError, match="order 'cols'; allowed: rows, union"):
        gated_experts_cpu(x, weights, experts, counts, ks, activation, "cols")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
def test_gated_masked_activation_matches_reference(dtype, activation):
    """The masked path of a step with `gated` rows: the fused C pass (SiLU, GELU tanh) and the
    torch fallback (other activations) keep each row's k pool neurons of largest |act(gate)|,
    a k = 0 row its whole pool, and give the masked activation's values on them."""
    from vllm_griffin.ops import dispatch
    from vllm_griffin.ops.reference import gated_keep_reference

    gen = torch.Generator().manual_seed(3)
    rows, width = 5, 77
    gate_up = torch.randn(rows, 2 * width, generator=gen).to(dtype)
    masks = torch.rand(7, width, generator=gen) < 0.6
    slots = torch.tensor([6, 0, 3, 3, 2])
    ks = torch.tensor([10, 0, 25, 3, 1000])  # 1000: more than the pool, keeps it all
    fn = dispatch.gated_masked_activation_fn(torch.device("cpu"), dtype, activation, act_and_mul(activation), True)
    got = fn(gate_up, masks, slots, ks)
    gate = gate_up[:, :width].float()
    keep = gated_keep_reference(ACTS[activation](gate), masks, slots, ks)
    assert torch.equal(keep.sum(-1), torch.minimum(ks.where(ks > 0, width), masks[slots].sum(-1)))
    assert torch.equal(got != 0, keep & (gate_up[:, width:] != 0))
    want = act_and_mul(activation)(gate_up.float()) * keep
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), want, atol=tol, rtol=tol)


# --- the union kernel's register tiles: a row's bits never depend on its batch ---

# The instruction sets the kernels compile for (16, 8 and 1 lanes): this CPU's own, and
# the narrower ones built with those features turned off (AVX-512 off: an AVX2 machine).
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "portable": ["-mno-avx2", "-mno-fma"]}


@pytest.fixture(scope="module", params=list(ISA_FLAGS))
def kernel_isa(request, tmp_path_factory):
    """The expert kernels as built for each instruction set, loaded in place of this CPU's
    build for the test (cpu_kernel.load() returns it)."""
    from vllm_griffin.ops import cpu_kernel

    if not ISA_FLAGS[request.param]:
        yield request.param
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_GRIFFIN_HOME", str(tmp_path_factory.mktemp(request.param)))
        mp.setattr(cpu_kernel, "FLAGS", cpu_kernel.FLAGS + ISA_FLAGS[request.param])
        mp.setattr(cpu_kernel, "_lib", None)
        mp.setattr(cpu_kernel, "_failed", False)
        assert cpu_kernel.load() is not None
        yield request.param


def expert_sets(rows, width, counts, pattern, gen):
    """[rows, max(counts)] ascending experts: "random" sets, "shared" (each row's top of one
    neuron ranking plus noise: overlapping like a trained model's requests), "identical"
    (one set for every row) or "disjoint" (no neuron used by two rows)."""
    kmax = max(max(counts), 1)
    if pattern == "disjoint":
        perm = torch.randperm(width, generator=gen)
        starts = [sum(counts[:t]) for t in range(rows)]
        assert sum(counts) <= width
        sets = [perm[s:s + c] for s, c in zip(starts, counts)]
    elif pattern == "identical":
        sets = [torch.randperm(width, generator=gen)[:kmax]] * rows
    elif pattern == "shared":
        base = torch.randn(width, generator=gen)
        sets = [torch.topk(base + 0.6 * torch.randn(width, generator=gen), kmax).indices for _ in range(rows)]
    else:
        sets = [torch.randperm(width, generator=gen)[:kmax] for _ in range(rows)]
    out = torch.zeros(rows, kmax, dtype=torch.int64)
    for t, s in enumerate(sets):
        s = s[:max(counts[t], 0)].sort().values
        # past the count: arbitrary entries (other rows' or repeats) that must be ignored
        out[t] = torch.cat([s, torch.randint(0, width, (kmax - len(s),), generator=gen)])
    return out


UNION_CASES = [  # rows, hidden, width, counts, pattern
    (2, 13, 10, [5, 7], "random"),                     # H below one vector: all scalar tail
    (3, 37, 50, [25, 0, 50], "random"),                # a row with no experts, one with all
    (4, 100, 80, [40, 40, 40, 40], "identical"),
    (4, 100, 80, [20, 20, 20, 20], "disjoint"),
    (5, 579, 300, [150] * 5, "shared"),                # H = 36 * 16 + 3
    (8, 264, 700, [350, 300, 0, 350, 1, 349, 350, 200], "shared"),  # several neuron blocks
    (9, 64, 97, [48] * 9, "random"),                   # a partial row tile
    (16, 136, 1000, [500] * 16, "shared"),             # H = 8.5 vectors of 16
    (16, 200, 64, [4] * 16, "disjoint"),
    (70, 48, 120, [60] * 70, "shared"),                # more rows than one pass (64)
]


def union_outputs(x, weights, experts, counts, activation="silu"):
    return (experts_mlp_cpu(x, weights, experts, counts, activation, "union"),
            experts_mlp_cpu(x, weights, experts, counts, activation, "rows"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, hidden, width, counts, pattern", UNION_CASES)
def test_union_rows_are_bit_identical_to_each_row_alone(kernel_isa, dtype, rows, hidden, width, counts, pattern):
    """The union kernel (register tiles over rows x neurons, masked down projection) gives
    each row the bits it gets alone, in any batch and at any position in it, and the row
    kernel's bits; both within float32 rounding of the float64 reference."""
    gen = torch.Generator().manual_seed(rows * 1000 + hidden)
    x = torch.randn(rows, hidden, generator=gen)
    w_gate_up = (torch.randn(2 * width, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    w_down = (torch.randn(hidden, width, generator=gen) / width ** 0.5).to(dtype)
    experts = expert_sets(rows, width, counts, pattern, gen)
    counts = torch.tensor(counts)
    interleaved = ExpertWeights.interleaved(w_gate_up, w_down)
    separate = ExpertWeights.separate(w_gate_up, w_down.t().contiguous())
    union, by_rows = union_outputs(x, interleaved, experts, counts)
    assert torch.equal(union, by_rows)
    assert torch.equal(experts_mlp_cpu(x, separate, experts, counts, "silu", "union"), union)
    for t in range(rows):
        alone = union_outputs(x[t:t + 1], interleaved, experts[t:t + 1], counts[t:t + 1])
        assert torch.equal(alone[0][0], union[t]) and torch.equal(alone[1][0], union[t])
    # Another batch order (rows land in other tiles, beside other rows): the same bits.
    perm = torch.randperm(rows, generator=gen)
    shuffled = experts_mlp_cpu(x[perm], interleaved, experts[perm], counts[perm], "silu", "union")
    assert torch.equal(shuffled, union[perm])
    # A batch of the row twice, beside a row with no experts.
    pair = torch.stack([x[0], x[0], x[-1]])
    twice = experts_mlp_cpu(pair, interleaved, torch.stack([experts[0], experts[0], experts[-1]]),
                            torch.tensor([counts[0], counts[0], 0]), "silu", "union")
    assert torch.equal(twice[0], union[0]) and torch.equal(twice[1], union[0]) and not twice[2].any()
    want = experts_mlp_gather(x.double(), ExpertWeights.separate(w_gate_up.double(), w_down.t().contiguous().double()),
                              experts, counts, act_and_mul("silu"))
    torch.testing.assert_close(union.double(), want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_union_rows_ignore_neurons_they_do_not_keep(kernel_isa, dtype):
    """Rows that do not keep a neuron skip it (no FMA by 0): a neuron whose weights are
    inf / NaN, kept by one row only, leaves every other row finite and as it is alone."""
    gen = torch.Generator().manual_seed(11)
    rows, hidden, width = 6, 150, 40
    x = torch.randn(rows, hidden, generator=gen)
    w_gate_up = (torch.randn(2 * width, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    w_down = (torch.randn(hidden, width, generator=gen) / width ** 0.5).to(dtype)
    w_gate_up[[7, width + 7]] = float("inf")
    w_down[:, 7] = float("nan")
    others = torch.cat([torch.arange(7), torch.arange(8, width)])  # every neuron but 7
    experts = torch.stack([others[torch.randperm(width - 1, generator=gen)[:20]].sort().values for _ in range(rows)])
    experts[2] = torch.cat([torch.tensor([7]), experts[2, 1:]]).sort().values  # row 2 keeps neuron 7
    counts = torch.full((rows,), 20)
    weights = ExpertWeights.interleaved(w_gate_up, w_down)
    union = experts_mlp_cpu(x, weights, experts, counts, "silu", "union")
    assert union[2].isnan().all()
    for t in (0, 1, 3, 4, 5):
        alone = experts_mlp_cpu(x[t:t + 1], weights, experts[t:t + 1], counts[t:t + 1], "silu", "rows")
        assert union[t].isfinite().all() and torch.equal(union[t], alone[0])
