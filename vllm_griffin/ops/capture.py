"""Prefill capture of GRIFFIN's prompt statistic: one entry point, two paths.

Every prefill token of every layer adds ``z_t**2 / ||z_t||**2`` to its
sequence's accumulator row (and to its KV block's row for the prefix cache).
In plain torch that is a row gather, a square, a division and two index_adds,
each materialising a full [tokens, D] float32 copy (64 MiB per layer at 2048
tokens, ~8 % of a CPU prefill step). The C kernel instead walks z once, token
by token, with no temporaries. GPUs, float16 and machines without a C compiler
use the torch reference (same contract, vllm_griffin/ops/reference.py).
"""

from __future__ import annotations

import torch

from vllm_griffin.ops import cpu_kernel
from vllm_griffin.ops.reference import capture_reference

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def uses_kernel(z: torch.Tensor) -> bool:
    """Whether ``z`` goes to the C kernel (CPU float32/bfloat16, library built)."""
    return z.device.type == "cpu" and z.dtype in _KERNEL_DTYPES and cpu_kernel.load() is not None


def capture_statistic(z: torch.Tensor, pos: torch.Tensor | None, acc: torch.Tensor | None,
                      acc_idx: torch.Tensor | None, blk: torch.Tensor | None = None,
                      blk_idx: torch.Tensor | None = None, sq_norms: torch.Tensor | None = None,
                      trusted_indices: bool = False) -> None:
    """In place: for each token m (row ``pos[m]`` of z [N, D]; every row when ``pos``
    is None), ``acc[acc_idx[m]] += z**2 / ||z||**2`` and ``blk[blk_idx[m]] += ...``;
    an index of -1 skips that target. ``sq_norms`` ([M] or [M, 1], from
    :func:`capture_sq_norms` all-reduced across tensor-parallel ranks) replaces the
    rank-local norms. An all-zero row adds 0. ``trusted_indices``: int64 contiguous
    indices, one per token, in range, and float32 contiguous targets (a step plan's):
    the C kernel does not check them again."""
    if uses_kernel(z):
        cpu_kernel.capture_cpu(z, pos, sq_norms, acc, acc_idx, blk, blk_idx, check=not trusted_indices)
    else:
        capture_reference(z, pos, sq_norms, acc, acc_idx, blk, blk_idx)


def capture_sq_norms(z: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
    """[M, 1] float32 ``||z[pos[m]]||**2`` of this rank's slice (to all-reduce under TP)."""
    if uses_kernel(z):
        return cpu_kernel.sq_norms_cpu(z, pos)
    rows = z if pos is None else z.index_select(0, pos)
    return rows.float().square().sum(dim=-1, keepdim=True)
