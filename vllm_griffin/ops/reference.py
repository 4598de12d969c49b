"""Plain-torch references for running each decode row on its own experts.

Shapes (one layer, one tensor-parallel rank):
    x          [T, H]      decode tokens
    w_gate_up  [2D, H]     vLLM's merged weight: gate rows, then up rows
    w_down_t   [D, H]      the down projection transposed, so an expert's column is a row
    experts    [T, K]      int64 neuron indices per row; row t uses the first counts[t]
    counts     [T]         int64, 0 <= counts[t] <= K
    act_and_mul            the model's own activation module, [.., 2n] -> [.., n]
Returns [T, H] -- the rank's partial sum (tensor-parallel reduction is the caller's).
Both functions give the same numbers up to float summation order.
"""

from __future__ import annotations

from typing import Callable

import torch

ActAndMul = Callable[[torch.Tensor], torch.Tensor]


def experts_mlp_gather(x, w_gate_up, w_down_t, experts, counts, act_and_mul: ActAndMul) -> torch.Tensor:
    """Gather each row's gate/up rows and down columns, then batched GEMV."""
    width = w_down_t.shape[0]
    if experts.shape[1] == 0:
        return x.new_zeros(x.shape[0], w_down_t.shape[1])
    gate = torch.bmm(w_gate_up[experts], x.unsqueeze(-1)).squeeze(-1)           # [T, K]
    up = torch.bmm(w_gate_up[experts + width], x.unsqueeze(-1)).squeeze(-1)     # [T, K]
    h = act_and_mul(torch.cat([gate, up], dim=-1))                               # [T, K]
    h = h * _valid(experts, counts).to(h.dtype)
    return torch.bmm(h.unsqueeze(1), w_down_t[experts]).squeeze(1)


def experts_mlp_masked(x, w_gate_up, w_down_t, experts, counts, act_and_mul: ActAndMul) -> torch.Tensor:
    """Dense GEMMs with every non-expert neuron zeroed per row."""
    z = act_and_mul(x @ w_gate_up.t())                                            # [T, D]
    width = z.shape[1]
    # Unused table entries (past a row's count) may repeat real experts, so
    # they are pointed at a spare column instead of writing zeros over them.
    idx = torch.where(_valid(experts, counts), experts, width)
    mask = z.new_zeros(z.shape[0], width + 1).scatter_(1, idx, 1.0)[:, :width]
    return (z * mask) @ w_down_t


def _valid(experts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(experts.shape[1], device=experts.device)
    return positions.unsqueeze(0) < counts.unsqueeze(1)
