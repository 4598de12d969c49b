"""Plain-torch references for running each decode row on its own experts.

Shapes (one layer, one tensor-parallel rank):
    x          [T, H]      decode tokens
    weights    ExpertWeights: gate [D, H], up [D, H], down_t [D, H] (the down
               projection transposed, so an expert's column is a row); a
               non-gated MLP (OPT: relu(fc1 x)) has no ``up`` and ``gate`` is
               fc1; optional biases: gate_bias/up_bias [D] (gathered with the
               experts) and down_bias [H] (added whole)
    experts    [T, K]      int64 neuron indices per row; row t uses the first counts[t]
    counts     [T]         int64, 0 <= counts[t] <= K
    act_and_mul            the model's own activation module, [.., 2n] -> [.., n]
                           (non-gated: the plain activation, [.., n] -> [.., n])
Returns [T, H] -- the rank's partial sum (tensor-parallel reduction is the caller's).
Both functions give the same numbers up to float summation order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_griffin.core.algorithm import prompt_contributions

ActAndMul = Callable[[torch.Tensor], torch.Tensor]


class ExpertWeights:
    """One layer's expert rows, the way the kernels read them: neuron j's gate,
    up and down-transposed rows at ``gate[j]``, ``up[j]``, ``down_t[j]`` ([D, H]
    views sharing one row stride)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor | None, down_t: torch.Tensor, *,
                 gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
                 down_bias: torch.Tensor | None = None):
        assert gate.shape == down_t.shape and gate.dtype == down_t.dtype
        assert gate.stride() == down_t.stride() and gate.stride(1) == 1
        if up is not None:
            assert up.shape == gate.shape and up.dtype == gate.dtype and up.stride() == gate.stride()
        self.gate, self.up, self.down_t = gate, up, down_t
        self.gate_bias, self.up_bias, self.down_bias = gate_bias, up_bias, down_bias

    @property
    def gated(self) -> bool:
        return self.up is not None

    @property
    def has_bias(self) -> bool:
        return any(b is not None for b in (self.gate_bias, self.up_bias, self.down_bias))

    @classmethod
    def interleaved(cls, w_gate_up: torch.Tensor, w_down: torch.Tensor, b_gate_up: torch.Tensor | None = None,
                    b_down: torch.Tensor | None = None) -> ExpertWeights:
        """From vLLM's [2D, H] gate_up and [H, D] down weights into one [D, 3, H] block:
        a neuron's three rows are adjacent, so gathering experts reads one stream."""
        width = w_down.shape[1]
        block = torch.empty(width, 3, w_down.shape[0], dtype=w_down.dtype, device=w_down.device)
        block[:, 0].copy_(w_gate_up[:width])
        block[:, 1].copy_(w_gate_up[width:])
        block[:, 2].copy_(w_down.t())
        return cls(block[:, 0], block[:, 1], block[:, 2], **_gated_biases(width, b_gate_up, b_down))

    @classmethod
    def separate(cls, w_gate_up: torch.Tensor, w_down_t: torch.Tensor, b_gate_up: torch.Tensor | None = None,
                 b_down: torch.Tensor | None = None) -> ExpertWeights:
        width = w_down_t.shape[0]
        return cls(w_gate_up[:width], w_gate_up[width:], w_down_t, **_gated_biases(width, b_gate_up, b_down))

    @classmethod
    def ungated(cls, w_fc1: torch.Tensor, w_fc2: torch.Tensor, fc1_bias: torch.Tensor | None,
                fc2_bias: torch.Tensor | None) -> ExpertWeights:
        """A plain MLP, act(fc1 x + b1) -> fc2: one [D, 2, H] block (fc1 row, fc2 column)."""
        block = torch.empty(w_fc1.shape[0], 2, w_fc1.shape[1], dtype=w_fc1.dtype, device=w_fc1.device)
        block[:, 0].copy_(w_fc1)
        block[:, 1].copy_(w_fc2.t())
        return cls(block[:, 0], None, block[:, 1], gate_bias=fc1_bias, down_bias=fc2_bias)

    @property
    def width(self) -> int:
        return self.gate.shape[0]


def experts_mlp_gather(x, weights: ExpertWeights, experts, counts, act_and_mul: ActAndMul) -> torch.Tensor:
    """Gather each row's gate/up rows and down columns, then batched GEMV."""
    if experts.shape[1] == 0:
        return x.new_zeros(x.shape[0], weights.down_t.shape[1])
    x = x.to(weights.gate.dtype)

    def project(w, bias):  # [T, K]: each row's experts' rows of w times that row's x
        y = torch.bmm(w[experts], x.unsqueeze(-1)).squeeze(-1)
        return y if bias is None else y + bias[experts]

    gate = project(weights.gate, weights.gate_bias)
    if weights.gated:
        h = act_and_mul(torch.cat([gate, project(weights.up, weights.up_bias)], dim=-1))
    else:
        h = act_and_mul(gate)
    h = h * valid_entries(experts, counts).to(h.dtype)
    out = torch.bmm(h.unsqueeze(1), weights.down_t[experts]).squeeze(1)
    return out if weights.down_bias is None else out + weights.down_bias


def experts_mlp_masked(x, weights: ExpertWeights, experts, counts, act_and_mul: ActAndMul) -> torch.Tensor:
    """Dense GEMMs with every non-expert neuron zeroed per row."""
    x = x.to(weights.gate.dtype)

    def project(w, bias):  # [T, D]
        y = x @ w.t()
        return y if bias is None else y + bias

    gate = project(weights.gate, weights.gate_bias)
    if weights.gated:
        z = act_and_mul(torch.cat([gate, project(weights.up, weights.up_bias)], dim=-1))
    else:
        z = act_and_mul(gate)
    width = z.shape[1]
    # Unused table entries (past a row's count) may repeat real experts, so
    # they are pointed at a spare column instead of writing zeros over them.
    idx = torch.where(valid_entries(experts, counts), experts, width)
    mask = z.new_zeros(z.shape[0], width + 1).scatter_(1, idx, 1.0)[:, :width]
    out = (z * mask) @ weights.down_t
    return out if weights.down_bias is None else out + weights.down_bias


def gated_experts_reference(x, weights: ExpertWeights, pool: torch.Tensor, k: int,
                            act_and_mul: ActAndMul) -> torch.Tensor:
    """The ``gated`` method's decode MLP, dense and masked: each row keeps the ``k`` neurons of
    its ``pool`` ([T, D] bool) whose activated gate is largest (algorithm.token_experts)."""
    from vllm_griffin.core.algorithm import token_experts

    x = x.to(weights.gate.dtype)
    gate = x @ weights.gate.t()
    if weights.gate_bias is not None:
        gate = gate + weights.gate_bias
    if weights.gated:
        up = x @ weights.up.t()
        if weights.up_bias is not None:
            up = up + weights.up_bias
        gate_act = act_and_mul(torch.cat([gate, torch.ones_like(gate)], dim=-1))
        z = act_and_mul(torch.cat([gate, up], dim=-1))
    else:
        z = gate_act = act_and_mul(gate)
    z = z * token_experts(gate_act, pool, k).to(z.dtype)
    out = z @ weights.down_t
    return out if weights.down_bias is None else out + weights.down_bias


def gated_keep_reference(gate_act: torch.Tensor, masks: torch.Tensor, slots: torch.Tensor,
                         ks: torch.Tensor) -> torch.Tensor:
    """[T, D] bool for a masked step with `gated` rows: row t keeps the ``ks[t]`` neurons of
    its pool ``masks[slots[t]]`` whose activated gate ``gate_act[t]`` is largest in magnitude
    (algorithm.token_experts); ``ks[t] = 0``, a row of another method: its whole pool."""
    from vllm_griffin.core.algorithm import token_experts

    keep = masks[slots]  # advanced indexing: a copy, safe to write
    for k in ks.unique().tolist():
        if k > 0:
            rows = (ks == k).nonzero().flatten()
            # `& pool`: a k beyond the pool's size keeps the pool, not neurons outside it.
            keep[rows] = token_experts(gate_act[rows], keep[rows], min(k, keep.shape[-1])) & keep[rows]
    return keep


def _gated_biases(width: int, b_gate_up: torch.Tensor | None, b_down: torch.Tensor | None) -> dict:
    """vLLM's merged [2D] gate_up bias split like its weight, plus down's [H] bias."""
    if b_gate_up is None:
        return {"down_bias": b_down}
    return {"gate_bias": b_gate_up[:width], "up_bias": b_gate_up[width:], "down_bias": b_down}


def valid_entries(experts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[T, K] bool: which expert-table entries are real (the first counts[t] of row t)."""
    positions = torch.arange(experts.shape[1], device=experts.device)
    return positions.unsqueeze(0) < counts.unsqueeze(1)


def capture_reference(z, pos, sq_norms, acc, acc_idx, blk=None, blk_idx=None) -> None:
    """Prefill capture, in place: token m (row ``pos[m]`` of z [N, D]; row m when
    ``pos`` is None) adds its contributions z**2 / ||z||**2 to ``acc[acc_idx[m]]``
    and ``blk[blk_idx[m]]`` ([S, D] / [B, D] float32); an index < 0 skips that
    target. ``sq_norms`` ([M] or [M, 1]) replaces the row norms (tensor-parallel
    slice). The C kernel's oracle, and the path for GPUs and other dtypes."""
    rows = z if pos is None else z.index_select(0, pos)
    if sq_norms is not None:
        sq_norms = sq_norms.reshape(-1, 1)
    contrib = prompt_contributions(rows, sq_norms)
    for target, idx in ((acc, acc_idx), (blk, blk_idx)):
        if target is not None and target.shape[0]:
            # Skipped tokens add an exact 0 to row 0: no boolean indexing, so no device sync.
            idx = idx.reshape(-1)
            skip = (idx < 0).unsqueeze(-1)
            target.index_add_(0, idx.clamp(min=0), contrib.masked_fill(skip, 0.0))


def keep_rows_reference(z: torch.Tensor, masks: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """In place: row t of z keeps only the neurons ``masks[slots[t]]`` marks (others
    become exactly 0); returns z. The C kernel's oracle."""
    return z.masked_fill_(~masks.index_select(0, slots), 0)


def act_keep_reference(gate_up: torch.Tensor, masks: torch.Tensor, slots: torch.Tensor,
                       act_and_mul: ActAndMul) -> torch.Tensor:
    """The masked path's activation: ``act_and_mul(gate_up)`` [T, D], row t keeping only
    the neurons ``masks[slots[t]]`` marks (others exactly 0). The fused C kernel's oracle."""
    return keep_rows_reference(act_and_mul(gate_up), masks, slots)
