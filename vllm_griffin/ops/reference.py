"""Plain-torch references for running each decode row on its own experts.

Shapes (one layer, one tensor-parallel rank):
    x          [T, H]      decode tokens
    weights    ExpertWeights: gate [D, H], up [D, H], down_t [D, H] (the down
               projection transposed, so an expert's column is a row)
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


class ExpertWeights:
    """One layer's expert rows, the way the kernels read them: neuron j's gate,
    up and down-transposed rows at ``gate[j]``, ``up[j]``, ``down_t[j]`` ([D, H]
    views sharing one row stride)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down_t: torch.Tensor):
        assert gate.shape == up.shape == down_t.shape and gate.dtype == up.dtype == down_t.dtype
        assert gate.stride() == up.stride() == down_t.stride() and gate.stride(1) == 1
        self.gate, self.up, self.down_t = gate, up, down_t

    @classmethod
    def interleaved(cls, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> "ExpertWeights":
        """From vLLM's [2D, H] gate_up and [H, D] down weights into one [D, 3, H] block:
        a neuron's three rows are adjacent, so gathering experts reads one stream."""
        width = w_down.shape[1]
        block = torch.empty(width, 3, w_down.shape[0], dtype=w_down.dtype, device=w_down.device)
        block[:, 0].copy_(w_gate_up[:width])
        block[:, 1].copy_(w_gate_up[width:])
        block[:, 2].copy_(w_down.t())
        return cls(block[:, 0], block[:, 1], block[:, 2])

    @classmethod
    def separate(cls, w_gate_up: torch.Tensor, w_down_t: torch.Tensor) -> "ExpertWeights":
        width = w_down_t.shape[0]
        return cls(w_gate_up[:width], w_gate_up[width:], w_down_t)

    @property
    def width(self) -> int:
        return self.gate.shape[0]


def experts_mlp_gather(x, weights: ExpertWeights, experts, counts, act_and_mul: ActAndMul) -> torch.Tensor:
    """Gather each row's gate/up rows and down columns, then batched GEMV."""
    if experts.shape[1] == 0:
        return x.new_zeros(x.shape[0], weights.down_t.shape[1])
    x = x.to(weights.gate.dtype)
    gate = torch.bmm(weights.gate[experts], x.unsqueeze(-1)).squeeze(-1)          # [T, K]
    up = torch.bmm(weights.up[experts], x.unsqueeze(-1)).squeeze(-1)              # [T, K]
    h = act_and_mul(torch.cat([gate, up], dim=-1))                               # [T, K]
    h = h * valid_entries(experts, counts).to(h.dtype)
    return torch.bmm(h.unsqueeze(1), weights.down_t[experts]).squeeze(1)


def experts_mlp_masked(x, weights: ExpertWeights, experts, counts, act_and_mul: ActAndMul) -> torch.Tensor:
    """Dense GEMMs with every non-expert neuron zeroed per row."""
    x = x.to(weights.gate.dtype)
    z = act_and_mul(torch.cat([x @ weights.gate.t(), x @ weights.up.t()], dim=-1))  # [T, D]
    width = z.shape[1]
    # Unused table entries (past a row's count) may repeat real experts, so
    # they are pointed at a spare column instead of writing zeros over them.
    idx = torch.where(valid_entries(experts, counts), experts, width)
    mask = z.new_zeros(z.shape[0], width + 1).scatter_(1, idx, 1.0)[:, :width]
    return (z * mask) @ weights.down_t


def valid_entries(experts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[T, K] bool: which expert-table entries are real (the first counts[t] of row t)."""
    positions = torch.arange(experts.shape[1], device=experts.device)
    return positions.unsqueeze(0) < counts.unsqueeze(1)
