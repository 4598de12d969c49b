"""Prefill capture of the prompt statistic: C kernel against the torch reference
(and both against a float64 loop), dispatch and fallback, tensor-parallel norms."""

from __future__ import annotations

import re

import pytest
import torch

from vllm_griffin.ops import capture as capture_mod
from vllm_griffin.ops import cpu_kernel
from vllm_griffin.ops.capture import capture_sq_norms, capture_statistic, uses_kernel
from vllm_griffin.ops.cpu_kernel import capture_cpu, sq_norms_cpu
from vllm_griffin.ops.reference import capture_reference

TINY = torch.finfo(torch.float32).tiny
SLOTS, BLOCKS = 4, 3


def loop_oracle(z, pos, sq_norms, acc, acc_idx, blk, blk_idx):
    """The contract written out token by token in float64 (independent of both paths)."""
    acc = acc.double().clone()
    blk = None if blk is None else blk.double().clone()
    for m in range(len(acc_idx)):
        row = z[m if pos is None else int(pos[m])].double()
        norm = float(sq_norms.reshape(-1)[m]) if sq_norms is not None else float(row.square().sum())
        contrib = row.square() / max(norm, TINY)
        if acc_idx[m] >= 0:
            acc[acc_idx[m]] += contrib
        if blk is not None and blk_idx[m] >= 0:
            blk[blk_idx[m]] += contrib
    return acc, blk


def scenario(rows, width, tokens, dtype, seed=0, with_blk=True):
    """z [rows, width]; ``tokens`` picks of its rows (some repeated) spread over the
    accumulator slots and block rows, with -1 skips in both and one token skipped by
    both; targets start non-zero and sit between guard rows that must stay untouched."""
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, width, generator=gen) * torch.rand(rows, 1, generator=gen) * 3).to(dtype)
    pos = torch.randint(0, rows, (tokens,), generator=gen)
    acc_idx = torch.arange(tokens) % (SLOTS + 1) - 1          # -1, 0, 1, 2, 3, -1, ...
    blk_idx = torch.arange(tokens) % (BLOCKS + 2) - 2          # -2 (also a skip), -1, 0, 1, 2, ...
    acc_idx[1], blk_idx[1] = -1, -1                           # nobody counts token 1
    acc_buf = torch.full((SLOTS + 2, width), -7.0)              # guard rows 0 and -1
    acc_buf[1:-1] = torch.rand(SLOTS, width, generator=gen)
    blk_buf = torch.full((BLOCKS + 2, width), -7.0)
    blk_buf[1:-1] = torch.rand(BLOCKS, width, generator=gen)
    if not with_blk:
        blk_buf, blk_idx = None, None
    return z, pos, acc_buf, acc_idx, blk_buf, blk_idx


def run(fn, z, pos, sq_norms, acc_buf, acc_idx, blk_buf, blk_idx):
    """Call ``fn`` on copies of the targets; return the whole buffers (guards included)."""
    acc_buf = acc_buf.clone()
    blk_buf = None if blk_buf is None else blk_buf.clone()
    fn(z, pos, sq_norms, acc_buf[1:-1], acc_idx, None if blk_buf is None else blk_buf[1:-1], blk_idx)
    return acc_buf, blk_buf


def check(got_buf, want, start_buf):
    assert torch.equal(got_buf[0], start_buf[0]) and torch.equal(got_buf[-1], start_buf[-1]), "guard rows written"
    assert not got_buf.isnan().any()
    torch.testing.assert_close(got_buf[1:-1].double(), want, rtol=1e-5, atol=1e-9)


def test_capture_kernel_builds():
    assert cpu_kernel.load() is not None
    assert uses_kernel(torch.zeros(2, 3)) and uses_kernel(torch.zeros(2, 3, dtype=torch.bfloat16))
    assert not uses_kernel(torch.zeros(2, 3, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width, rows, tokens", [(8192, 12, 20), (1536, 30, 40), (1000, 9, 17), (13, 5, 11)])
@pytest.mark.parametrize("given_norms", [False, True])
@pytest.mark.parametrize("with_blk", [True, False])
def test_kernel_matches_reference_and_loop(dtype, width, rows, tokens, given_norms, with_blk):
    z, pos, acc_buf, acc_idx, blk_buf, blk_idx = scenario(rows, width, tokens, dtype, with_blk=with_blk)
    z[pos[3]] = 0  # an all-zero row (ReLU) adds nothing, never NaN
    sq_norms = None
    if given_norms:  # as under tensor parallelism: the norm over more neurons than this slice holds
        sq_norms = z.index_select(0, pos).float().square().sum(-1, keepdim=True) * 1.5 + 0.25
        sq_norms[3] = 0
    want_acc, want_blk = loop_oracle(z, pos, sq_norms, acc_buf[1:-1], acc_idx,
                                     None if blk_buf is None else blk_buf[1:-1], blk_idx)
    for fn in (capture_cpu, capture_reference):
        got_acc, got_blk = run(fn, z, pos, sq_norms, acc_buf, acc_idx, blk_buf, blk_idx)
        check(got_acc, want_acc, acc_buf)
        if with_blk:
            check(got_blk, want_blk, blk_buf)
    # Every slot and block row received tokens, so nothing above passed by adding nothing.
    assert set(acc_idx.tolist()) >= set(range(SLOTS))
    assert not with_blk or set(blk_idx.tolist()) >= set(range(BLOCKS))
    assert not torch.allclose(want_acc, acc_buf[1:-1].double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_strided_view_pos_none_and_transposed_input(dtype):
    wide = torch.randn(10, 1100).to(dtype)
    z = wide[:, 50:1050]                                       # rows 1100 apart: used in place
    assert z.stride() == (1100, 1) and not z.is_contiguous()
    _, _, acc_buf, _, blk_buf, _ = scenario(10, 1000, 10, dtype)
    acc_idx = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2, 3, 0])
    blk_idx = torch.tensor([2, -1, 1, 0, 0, 1, -1, 2, 2, 1])
    want_acc, want_blk = loop_oracle(z, None, None, acc_buf[1:-1], acc_idx, blk_buf[1:-1], blk_idx)
    got_acc, got_blk = run(capture_cpu, z, None, None, acc_buf, acc_idx, blk_buf, blk_idx)
    check(got_acc, want_acc, acc_buf)
    check(got_blk, want_blk, blk_buf)
    # A column-strided z (a transpose) is copied to rows first; same numbers.
    zt = z.contiguous().t().contiguous().t()
    assert zt.stride(1) != 1
    got_acc, _ = run(capture_cpu, zt, None, None, acc_buf, acc_idx, None, None)
    check(got_acc, want_acc, acc_buf)


def test_tensor_parallel_slices_add_up_to_the_whole():
    """Two ranks each hold half the neurons: their norms summed (the all-reduce) and
    passed back give each rank exactly its slice of the single-rank statistic."""
    z, pos, _, acc_idx, _, _ = scenario(16, 1002, 24, torch.float32)
    whole = torch.zeros(SLOTS, 1002)
    capture_statistic(z, pos, whole, acc_idx)
    halves = (z[:, :501], z[:, 501:])
    norms = capture_sq_norms(halves[0], pos) + capture_sq_norms(halves[1], pos)
    assert norms.shape == (24, 1)
    torch.testing.assert_close(norms, z[pos].square().sum(-1, keepdim=True), rtol=1e-5, atol=0)
    parts = []
    for half in halves:
        part = torch.zeros(SLOTS, 501)
        capture_statistic(half, pos, part, acc_idx, sq_norms=norms)
        parts.append(part)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sq_norms_kernel(dtype):
    z = torch.randn(7, 1037).to(dtype)
    z[2] = 0
    want = z.double().square().sum(-1, keepdim=True)
    torch.testing.assert_close(sq_norms_cpu(z).double(), want, rtol=1e-5, atol=0)
    pos = torch.tensor([6, 2, 2, 0])
    torch.testing.assert_close(sq_norms_cpu(z, pos).double(), want[pos], rtol=1e-5, atol=0)


def test_dispatch_uses_kernel_on_cpu(monkeypatch):
    def refuse(*args):
        raise AssertionError("the torch reference ran although the C kernel is available")
    monkeypatch.setattr(capture_mod, "capture_reference", refuse)
    z, pos, acc_buf, acc_idx, blk_buf, blk_idx = scenario(6, 40, 9, torch.bfloat16)
    acc, blk = acc_buf[1:-1].clone(), blk_buf[1:-1].clone()
    capture_statistic(z, pos, acc, acc_idx, blk, blk_idx)
    want_acc, want_blk = loop_oracle(z, pos, None, acc_buf[1:-1], acc_idx, blk_buf[1:-1], blk_idx)
    torch.testing.assert_close(acc.double(), want_acc, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(blk.double(), want_blk, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("why", ["no library", "float16"])
def test_dispatch_falls_back_to_reference(monkeypatch, why):
    def refuse(*args):
        raise AssertionError("the C kernel ran")
    monkeypatch.setattr(cpu_kernel, "capture_cpu", refuse)
    monkeypatch.setattr(cpu_kernel, "sq_norms_cpu", refuse)
    dtype = torch.float32
    if why == "no library":  # as when no C compiler is installed
        monkeypatch.setattr(cpu_kernel, "_lib", None)
        monkeypatch.setattr(cpu_kernel, "_failed", True)
        assert cpu_kernel.load() is None
    else:
        dtype = torch.float16
    z, pos, acc_buf, acc_idx, blk_buf, blk_idx = scenario(6, 40, 9, dtype)
    acc, blk = acc_buf[1:-1].clone(), blk_buf[1:-1].clone()
    capture_statistic(z, pos, acc, acc_idx, blk, blk_idx)
    want_acc, want_blk = loop_oracle(z, pos, None, acc_buf[1:-1], acc_idx, blk_buf[1:-1], blk_idx)
    torch.testing.assert_close(acc.double(), want_acc, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(blk.double(), want_blk, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(capture_sq_norms(z, pos), z[pos].float().square().sum(-1, keepdim=True))


def test_portable_build_matches(monkeypatch, tmp_path):
    """The one-lane fallback (no AVX2) compiled on its own gives the same numbers."""
    z, pos, acc_buf, acc_idx, blk_buf, blk_idx = scenario(9, 1001, 15, torch.bfloat16)
    want_acc, want_blk = loop_oracle(z, pos, None, acc_buf[1:-1], acc_idx, blk_buf[1:-1], blk_idx)
    monkeypatch.setenv("VLLM_GRIFFIN_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "FLAGS", cpu_kernel.FLAGS + ["-mno-avx2", "-mno-fma"])
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setattr(cpu_kernel, "_failed", False)
    assert cpu_kernel.load() is not None and list(tmp_path.glob("kernels/*/libgriffin_cpu.so"))
    got_acc, got_blk = run(capture_cpu, z, pos, None, acc_buf, acc_idx, blk_buf, blk_idx)
    check(got_acc, want_acc, acc_buf)
    check(got_blk, want_blk, blk_buf)


@pytest.mark.parametrize("bad, message", [
    (dict(acc_idx=torch.tensor([0, 4, -1])), "acc_idx[1] = 4; allowed: -1 (skip) or 0..3"),
    (dict(blk_idx=torch.tensor([0, 0, 3])), "blk_idx[2] = 3; allowed: -1 (skip) or 0..2"),
    (dict(pos=torch.tensor([0, 5, 1])), "pos[1] = 5; allowed: 0..4"),
    (dict(pos=torch.tensor([0, -1, 1])), "pos[1] = -1; allowed: 0..4"),
    (dict(acc_idx=torch.tensor([0, 1])), "acc_idx has 2 entries; expected 3"),
    (dict(acc=torch.zeros(SLOTS, 8, dtype=torch.bfloat16)), "acc must be a contiguous float32 CPU"),
    (dict(blk=torch.zeros(8, BLOCKS).t()), "blk must be a contiguous float32 CPU"),
    (dict(sq_norms=torch.ones(4)), "sq_norms has 4 entries; expected 3"),
])
def test_bad_input_is_refused_before_the_kernel_writes(bad, message):
    args = dict(z=torch.randn(5, 8), pos=torch.tensor([0, 4, 1]), sq_norms=None, acc=torch.zeros(SLOTS, 8),
                acc_idx=torch.tensor([0, 3, -1]), blk=torch.zeros(BLOCKS, 8), blk_idx=torch.tensor([2, -1, 0]))
    args.update(bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        capture_cpu(**args)
    assert not args["acc"].any() and not args["blk"].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unchecked_call_gives_the_same_bits(dtype):
    """A step plan's indices skip the wrapper's checks (state.capture, every layer): same result."""
    z, pos, acc_buf, acc_idx, blk_buf, blk_idx = scenario(9, 300, 20, dtype, seed=3)
    norms = capture_sq_norms(z, pos) * 1.5
    for sq in (None, norms):
        checked = run(capture_cpu, z, pos, sq, acc_buf, acc_idx, blk_buf, blk_idx)
        unchecked = run(lambda *a: capture_cpu(*a, check=False), z, pos, sq, acc_buf, acc_idx, blk_buf, blk_idx)
        assert torch.equal(checked[0], unchecked[0]) and torch.equal(checked[1], unchecked[1])
        assert not torch.equal(checked[0], acc_buf)  # it did add something
