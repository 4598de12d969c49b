"""Triton kernels: each decode row runs its own experts (batched gather-GEMV).

Same contract as :func:`vllm_griffin.ops.reference.experts_mlp_gather`, which
the tests use as the oracle (on CPU under ``TRITON_INTERPRET=1``).

Two launches per layer, both streaming only the rows' experts:

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
