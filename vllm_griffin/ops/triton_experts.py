"""Triton kernels for decode rows, each row through its own experts.

Same contract as :func:`vllm_griffin.ops.reference.experts_mlp_gather`, which
the tests use as the oracle (on CPU under ``TRITON_INTERPRET=1``). Two variants:

* :func:`experts_mlp_triton` -- per row (batched gather-GEMV): each row streams
  its own experts' weights; best for one row or rows with little overlap.
* :func:`experts_mlp_triton_union` -- union-tiled: the step's rows' union of
  neurons is compacted on the device, each union neuron's gate/up/down rows are
  loaded once for all rows (``tl.dot`` over a [rows, neurons] tile) and each row
  is masked to its own experts; design notes above its kernels below.

Per-row variant: two launches per layer, both streaming only the rows' experts:

1. ``_gate_up_kernel``: grid (rows, expert blocks, hidden splits). Loads
   BLOCK_K gate rows and the matching up rows (contiguous rows, so the gather
   is a row gather) and dots them with x; ``_act_mul_kernel`` adds the splits
   in a fixed order and writes h = act(g) * u [T, K].
2. ``_down_kernel``: grid (rows, hidden blocks, splits). Streams the experts'
   rows of ``down_t`` ([D, H]: a down column is a contiguous row) weighted by
   h; each split writes its own partial, summed afterwards in a fixed order
   (deterministic, no atomics).

Static shapes, no host synchronisation: rows past a row's ``count`` are masked
by the count read on the device, so the launch is CUDA-graph safe given fixed
buffers.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "relu": 2, "gelu": 3}


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        # tanh(v) = 2 * sigmoid(2v) - 1 (tl has no tanh on every backend)
        return 0.5 * g * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
    elif ACT == 2:
        return tl.maximum(g, 0.0)
    else:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))


@triton.jit
def _gate_up_kernel(x_ptr, gate_ptr, up_ptr, experts_ptr, counts_ptr, g_ptr, u_ptr,
                    H, K, stride_x, stride_w, stride_e, stride_ps, stride_pt,
                    SPLIT_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    # Grid (rows, expert blocks, hidden splits): many programs even for one row,
    # so enough loads are in flight to stream HBM.
    row = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    count = tl.load(counts_ptr + row)
    k_mask = offs_k < count
    idx = tl.load(experts_ptr + row * stride_e + offs_k, mask=k_mask, other=0).to(tl.int64)
    gate_rows = gate_ptr + idx[:, None] * stride_w
    up_rows = up_ptr + idx[:, None] * stride_w
    per_split = tl.cdiv(tl.cdiv(H, SPLIT_H), BLOCK_H) * BLOCK_H
    h_begin = split * per_split
    h_end = tl.minimum(h_begin + per_split, H)
    acc_g = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_K], dtype=tl.float32)
    for h0 in range(h_begin, h_end, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < h_end
        x = tl.load(x_ptr + row * stride_x + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        m = k_mask[:, None] & h_mask[None, :]
        wg = tl.load(gate_rows + offs_h[None, :], mask=m, other=0.0).to(tl.float32)
        wu = tl.load(up_rows + offs_h[None, :], mask=m, other=0.0).to(tl.float32)
        acc_g += tl.sum(wg * x[None, :], axis=1)
        acc_u += tl.sum(wu * x[None, :], axis=1)
    out = split * stride_ps + row * stride_pt + offs_k
    tl.store(g_ptr + out, acc_g, mask=offs_k < K)
    tl.store(u_ptr + out, acc_u, mask=offs_k < K)


@triton.jit
def _act_mul_kernel(g_ptr, u_ptr, counts_ptr, h_ptr, K, stride_ps, stride_pt,
                    ACT: tl.constexpr, SPLIT_H: tl.constexpr, BLOCK_K: tl.constexpr):
    # Sums the hidden splits in a fixed order, then h = act(g) * u (0 past the count).
    row = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    g = tl.zeros([BLOCK_K], dtype=tl.float32)
    u = tl.zeros([BLOCK_K], dtype=tl.float32)
    for s in range(SPLIT_H):
        g += tl.load(g_ptr + s * stride_ps + row * stride_pt + offs_k, mask=k_mask, other=0.0)
        u += tl.load(u_ptr + s * stride_ps + row * stride_pt + offs_k, mask=k_mask, other=0.0)
    count = tl.load(counts_ptr + row)
    h = tl.where(offs_k < count, _act(g, ACT) * u, 0.0)
    tl.store(h_ptr + row * K + offs_k, h, mask=k_mask)


@triton.jit
def _down_kernel(h_ptr, w_ptr, experts_ptr, counts_ptr, out_ptr,
                 H, K, stride_h, stride_w, stride_e, stride_os, stride_ot,
                 SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    h_mask = offs_h < H
    count = tl.load(counts_ptr + row)
    per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = split * per_split
    k_end = tl.minimum(k_begin + per_split, count)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        idx = tl.load(experts_ptr + row * stride_e + offs_k, mask=k_mask, other=0).to(tl.int64)
        hv = tl.load(h_ptr + row * stride_h + offs_k, mask=k_mask, other=0.0)
        w = tl.load(w_ptr + idx[:, None] * stride_w + offs_h[None, :],
                    mask=k_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * hv[:, None], axis=0)
    tl.store(out_ptr + split * stride_os + row * stride_ot + offs_h, acc, mask=h_mask)


def experts_mlp_triton(x, weights, experts, counts, activation: str = "silu",
                       block_k: int = 32, block_h: int = 128, split_h: int | None = None,
                       split_k: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """x [T, H], weights (ExpertWeights), experts [T, K] int, counts [T] int -> [T, H]."""
    rows, hidden = x.shape
    kmax = experts.shape[1]
    if rows == 0 or kmax == 0:
        return x.new_zeros(rows, hidden)
    x = x.contiguous()
    stride_w = weights.gate.stride(0)
    experts = experts.contiguous()
    counts = counts.to(torch.int32).contiguous()
    k_blocks = triton.cdiv(kmax, block_k)
    h_blocks = triton.cdiv(hidden, block_h)
    if split_h is None:
        # Enough programs to keep every SM streaming even for one row.
        split_h = max(1, min(h_blocks, 1024 // max(1, rows * k_blocks)))
    partial_g = torch.empty(split_h, rows, kmax, dtype=torch.float32, device=x.device)
    partial_u = torch.empty_like(partial_g)
    _gate_up_kernel[(rows, k_blocks, split_h)](
        x, weights.gate, weights.up, experts, counts, partial_g, partial_u, hidden, kmax,
        x.stride(0), stride_w, experts.stride(0), partial_g.stride(0), partial_g.stride(1),
        SPLIT_H=split_h, BLOCK_K=block_k, BLOCK_H=block_h, num_warps=num_warps)
    h = torch.empty(rows, kmax, dtype=torch.float32, device=x.device)
    _act_mul_kernel[(rows, triton.cdiv(kmax, 256))](
        partial_g, partial_u, counts, h, kmax, partial_g.stride(0), partial_g.stride(1),
        ACT=ACTIVATIONS[activation], SPLIT_H=split_h, BLOCK_K=256)
    if split_k is None:
        split_k = max(1, min(64, 1024 // max(1, rows * h_blocks)))
    partial = torch.empty(split_k, rows, hidden, dtype=torch.float32, device=x.device)
    _down_kernel[(rows, h_blocks, split_k)](
        h, weights.down_t, experts, counts, partial, hidden, kmax,
        h.stride(0), stride_w, experts.stride(0), partial.stride(0), partial.stride(1),
        SPLIT_K=split_k, BLOCK_K=block_k, BLOCK_H=block_h, num_warps=num_warps)
    return partial.sum(0).to(x.dtype)


# --- Union-tiled variant -----------------------------------------------------
#
# The per-row kernels above stream d * (MLP weights) per decode row, so at d = 0.5
# two rows already read as much as the dense GEMM. The union variant reads each
# neuron the step's rows use ONCE, for all rows, and masks per row:
#
# 0. Membership (torch ops, no host sync): ``member`` [T, D] (1 where row t uses
#    neuron j; the state's per-row masks, or scattered from the expert table) and
#    ``used`` = any row uses j. ``_compact_kernel`` turns ``used`` into the sorted
#    list of union neurons ``union`` [D] and its length ``n_union`` [1], both on
#    the device. Neuron-level, not tile-level: at d = 0.5 with random expert sets
#    almost every tile of 32 neurons holds some row's expert, so skipping tiles
#    would save nothing; compacting the union first lets each tile be full.
# 1. ``_union_gate_up_kernel``: grid (all union blocks the width allows, hidden
#    splits); a program past ``n_union`` does nothing, so the grid never depends
#    on data read from the device (CUDA-graph safe). A program loads BLOCK_U
#    union neurons' gate and up rows once and multiplies them with every row's x
#    (``tl.dot``, rows padded to BLOCK_T >= 16). With one split it finishes
#    h = act(g) * u * member[t, j] itself; with several, each split writes a
#    partial and ``_union_act_mul_kernel`` adds them in a fixed order.
# 2. ``_union_down_kernel``: grid (hidden blocks, union splits); each program
#    streams its share of the union's ``down_t`` rows once (``tl.dot`` of h
#    [BLOCK_T, BLOCK_U] with [BLOCK_U, BLOCK_H]); partials are summed in a fixed
#    order afterwards (deterministic, no atomics).
#
# h is stored in the weights' dtype, as vLLM's dense path keeps act(g) * u. The
# tiles' dot runs in the weights' dtype on GPUs (tensor cores) and in fp32
# ("ieee") for fp32 weights and under TRITON_INTERPRET, whose bf16 ``tl.dot``
# multiplies raw bit patterns (triton-lang/triton#11584, not supported there).
# More than MAX_UNION_ROWS rows run in chunks of that many (each chunk reads its
# own union), which keeps BLOCK_T and the register tiles bounded.

MAX_UNION_ROWS = 64


@triton.jit
def _compact_kernel(used_ptr, union_ptr, n_ptr, D, BLOCK: tl.constexpr):
    # One program: a running prefix sum gives each used neuron its slot in the list.
    carry = tl.zeros([], dtype=tl.int32)
    for d0 in range(0, D, BLOCK):
        offs = d0 + tl.arange(0, BLOCK)
        used = tl.load(used_ptr + offs, mask=offs < D, other=0).to(tl.int32)
        slot = carry + tl.cumsum(used, 0) - 1
        tl.store(union_ptr + slot, offs, mask=used > 0)
        carry += tl.sum(used, 0)
    tl.store(n_ptr, carry)


@triton.jit
def _union_gate_up_kernel(x_ptr, gate_ptr, up_ptr, union_ptr, n_ptr, member_ptr, g_ptr, u_ptr, h_ptr,
                          T, H, stride_x, stride_w, stride_m, stride_ps, stride_pt, stride_h,
                          ACT: tl.constexpr, SPLIT_H: tl.constexpr, DOT_FP32: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_H: tl.constexpr):
    offs_u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    split = tl.program_id(1)
    n_union = tl.load(n_ptr)
    if tl.program_id(0) * BLOCK_U < n_union:  # blocks past the union do nothing
        u_mask = offs_u < n_union
        idx = tl.load(union_ptr + offs_u, mask=u_mask, other=0).to(tl.int64)
        offs_t = tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        per_split = tl.cdiv(tl.cdiv(H, SPLIT_H), BLOCK_H) * BLOCK_H
        h_begin = split * per_split
        h_end = tl.minimum(h_begin + per_split, H)
        acc_g = tl.zeros([BLOCK_T, BLOCK_U], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_T, BLOCK_U], dtype=tl.float32)
        for h0 in range(h_begin, h_end, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_mask = offs_h < h_end
            x = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_h[None, :],
                        mask=t_mask[:, None] & h_mask[None, :], other=0.0)
            # [BLOCK_H, BLOCK_U]: the union neurons' rows, read once for all T rows.
            w_off = idx[None, :] * stride_w + offs_h[:, None]
            w_mask = h_mask[:, None] & u_mask[None, :]
            wg = tl.load(gate_ptr + w_off, mask=w_mask, other=0.0)
            wu = tl.load(up_ptr + w_off, mask=w_mask, other=0.0)
            if DOT_FP32:
                xf = x.to(tl.float32)
                acc_g = tl.dot(xf, wg.to(tl.float32), acc_g, input_precision="ieee")
                acc_u = tl.dot(xf, wu.to(tl.float32), acc_u, input_precision="ieee")
            else:
                acc_g = tl.dot(x, wg, acc_g)
                acc_u = tl.dot(x, wu, acc_u)
        tu_mask = t_mask[:, None] & u_mask[None, :]
        if SPLIT_H == 1:  # the whole dot is here: finish h at once (one launch fewer)
            member = tl.load(member_ptr + offs_t[:, None] * stride_m + idx[None, :], mask=tu_mask, other=0)
            h = tl.where(member != 0, _act(acc_g, ACT) * acc_u, 0.0)
            tl.store(h_ptr + offs_t[:, None] * stride_h + offs_u[None, :], h.to(h_ptr.dtype.element_ty),
                     mask=tu_mask)
        else:
            out = split * stride_ps + offs_t[:, None] * stride_pt + offs_u[None, :]
            tl.store(g_ptr + out, acc_g, mask=tu_mask)
            tl.store(u_ptr + out, acc_u, mask=tu_mask)


@triton.jit
def _union_act_mul_kernel(g_ptr, u_ptr, union_ptr, n_ptr, member_ptr, h_ptr, T, stride_m, stride_ps, stride_pt,
                          stride_h, ACT: tl.constexpr, SPLIT_H: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_U: tl.constexpr):
    # Sums the hidden splits in a fixed order, then h = act(g) * u where the row uses the neuron.
    offs_u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    n_union = tl.load(n_ptr)
    if tl.program_id(0) * BLOCK_U < n_union:
        offs_t = tl.arange(0, BLOCK_T)
        mask = (offs_t < T)[:, None] & (offs_u < n_union)[None, :]
        part = offs_t[:, None] * stride_pt + offs_u[None, :]
        g = tl.zeros([BLOCK_T, BLOCK_U], dtype=tl.float32)
        u = tl.zeros([BLOCK_T, BLOCK_U], dtype=tl.float32)
        for s in range(SPLIT_H):
            g += tl.load(g_ptr + s * stride_ps + part, mask=mask, other=0.0)
            u += tl.load(u_ptr + s * stride_ps + part, mask=mask, other=0.0)
        idx = tl.load(union_ptr + offs_u, mask=offs_u < n_union, other=0).to(tl.int64)
        member = tl.load(member_ptr + offs_t[:, None] * stride_m + idx[None, :], mask=mask, other=0)
        h = tl.where(member != 0, _act(g, ACT) * u, 0.0)
        tl.store(h_ptr + offs_t[:, None] * stride_h + offs_u[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _union_down_kernel(h_ptr, w_ptr, union_ptr, n_ptr, out_ptr, T, H, stride_h, stride_w, stride_os, stride_ot,
                       SPLIT_U: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_U: tl.constexpr, BLOCK_H: tl.constexpr):
    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(1)
    h_mask = offs_h < H
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    n_union = tl.load(n_ptr)
    # The union (read on the device) is shared out evenly between the splits.
    per_split = tl.cdiv(tl.cdiv(n_union, SPLIT_U), BLOCK_U) * BLOCK_U
    u_begin = split * per_split
    u_end = tl.minimum(u_begin + per_split, n_union)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for u0 in range(u_begin, u_end, BLOCK_U):
        offs_u = u0 + tl.arange(0, BLOCK_U)
        u_mask = offs_u < u_end
        idx = tl.load(union_ptr + offs_u, mask=u_mask, other=0).to(tl.int64)
        hv = tl.load(h_ptr + offs_t[:, None] * stride_h + offs_u[None, :],
                     mask=t_mask[:, None] & u_mask[None, :], other=0.0)
        w = tl.load(w_ptr + idx[:, None] * stride_w + offs_h[None, :],
                    mask=u_mask[:, None] & h_mask[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(hv.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(hv, w, acc)
    tl.store(out_ptr + split * stride_os + offs_t[:, None] * stride_ot + offs_h[None, :], acc,
             mask=t_mask[:, None] & h_mask[None, :])


def union_membership(experts: torch.Tensor, counts: torch.Tensor, width: int) -> torch.Tensor:
    """[T, D] uint8: 1 where row t uses neuron j (entries past a row's count go to a spare column)."""
    positions = torch.arange(experts.shape[1], device=experts.device)
    idx = torch.where(positions.unsqueeze(0) < counts.unsqueeze(1), experts.long(), width)
    member = torch.zeros(experts.shape[0], width + 1, dtype=torch.uint8, device=experts.device)
    return member.scatter_(1, idx, 1)[:, :width]


def union_neurons(member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """member [T, D] uint8 -> (the used neurons in ascending order, then garbage: [D] int32;
    how many there are: [1] int32). Both stay on the device."""
    width = member.shape[1]
    used = member.amax(0).contiguous()
    union = torch.empty(width, dtype=torch.int32, device=member.device)
    n_union = torch.empty(1, dtype=torch.int32, device=member.device)
    _compact_kernel[(1,)](used, union, n_union, width, BLOCK=min(triton.next_power_of_2(width), 16384),
                          num_warps=16 if width > 4096 else 4)
    return union, n_union


def experts_mlp_triton_union(x, weights, experts, counts, activation: str = "silu", masks=None,
                             block_u: int = 64, block_h: int = 64, split_h: int | None = None,
                             split_u: int | None = None, num_warps: int = 8,
                             dot_fp32: bool | None = None) -> torch.Tensor:
    """Union-tiled decode MLP: x [T, H], weights (ExpertWeights), experts [T, K] int,
    counts [T] int -> [T, H], each row through exactly its own experts.

    ``masks`` ([T, D] bool/uint8, optional): the rows' expert masks when the caller
    already has them (GRIFFIN's state does); must agree with experts/counts, which
    may then be None (the CUDA-graph path keeps only masks).
    ``dot_fp32``: None picks fp32 for fp32 weights and under TRITON_INTERPRET.
    ``num_warps`` 8: compiled for sm_90 with 64 x 64 tiles, the gate/up kernel spills
    registers with 4 warps at 64 rows and does not with 8 (ptxas -v).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is invalid; allowed: {', '.join(ACTIVATIONS)}")
    if not weights.gated or weights.has_bias:
        raise ValueError("weights: the union kernel takes gated MLPs without biases "
                         "(the torch paths run the others)")
    rows, hidden = x.shape
    width = weights.width
    if rows == 0 or (masks is None and experts.shape[1] == 0):
        return x.new_zeros(rows, hidden)
    if rows > MAX_UNION_ROWS:  # static chunks of rows (the row count is static under CUDA graphs)
        part = lambda t, i: None if t is None else t[i:i + MAX_UNION_ROWS]  # noqa: E731
        return torch.cat([
            experts_mlp_triton_union(x[i:i + MAX_UNION_ROWS], weights, part(experts, i), part(counts, i), activation,
                                     None if masks is None else masks[i:i + MAX_UNION_ROWS], block_u, block_h,
                                     split_h, split_u, num_warps, dot_fp32)
            for i in range(0, rows, MAX_UNION_ROWS)])
    dtype = weights.gate.dtype
    if dot_fp32 is None:
        dot_fp32 = dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    xw = x.to(dtype).contiguous()
    stride_w = weights.gate.stride(0)
    member = union_membership(experts, counts.to(experts.device), width) if masks is None else masks
    if member.dtype == torch.bool:
        member = member.view(torch.uint8)
    member = member.contiguous()  # the kernels index it as [T, D] rows
    union, n_union = union_neurons(member)

    block_t = max(16, triton.next_power_of_2(rows))
    u_blocks = triton.cdiv(width, block_u)
    h_blocks = triton.cdiv(hidden, block_h)
    # Default splits aim at ~1024 programs per launch so enough loads are in flight to
    # stream HBM (as the per-row kernel does); a guess until the H200 benchmark, which
    # records the best configuration per case.
    if split_h is None:
        split_h = max(1, min(h_blocks, 1024 // u_blocks))
    h = torch.empty(rows, width, dtype=dtype, device=x.device)
    partial_g = partial_u = h  # unused when the gate/up kernel finishes h itself
    if split_h > 1:
        partial_g = torch.empty(split_h, rows, width, dtype=torch.float32, device=x.device)
        partial_u = torch.empty_like(partial_g)
    stride_ps = partial_g.stride(0) if split_h > 1 else 0
    stride_pt = partial_g.stride(1) if split_h > 1 else 0
    act = ACTIVATIONS[activation]
    _union_gate_up_kernel[(u_blocks, split_h)](
        xw, weights.gate, weights.up, union, n_union, member, partial_g, partial_u, h,
        rows, hidden, xw.stride(0), stride_w, member.stride(0), stride_ps, stride_pt, h.stride(0),
        ACT=act, SPLIT_H=split_h, DOT_FP32=dot_fp32, BLOCK_T=block_t, BLOCK_U=block_u, BLOCK_H=block_h,
        num_warps=num_warps)
    if split_h > 1:
        _union_act_mul_kernel[(u_blocks,)](
            partial_g, partial_u, union, n_union, member, h, rows, member.stride(0), stride_ps, stride_pt,
            h.stride(0), ACT=act, SPLIT_H=split_h, BLOCK_T=block_t, BLOCK_U=block_u, num_warps=num_warps)
    if split_u is None:
        split_u = max(1, min(u_blocks, 1024 // h_blocks))
    partial = torch.empty(split_u, rows, hidden, dtype=torch.float32, device=x.device)
    _union_down_kernel[(h_blocks, split_u)](
        h, weights.down_t, union, n_union, partial, rows, hidden, h.stride(0), stride_w, partial.stride(0),
        partial.stride(1), SPLIT_U=split_u, DOT_FP32=dot_fp32, BLOCK_T=block_t, BLOCK_U=block_u,
        BLOCK_H=block_h, num_warps=num_warps)
    return partial.sum(0).to(x.dtype)
