"""Choose, per layer and step, how the step's decode rows run on their experts.

Paths (every one gives each row exactly its own experts' result):

* ``rows``   -- CPU kernel, each row streams its experts' weights (best for few rows);
* ``union``  -- CPU kernel, each needed neuron's weights are read once for all rows
  (the two CPU orders give identical bits, so switching between them never
  changes a row's result);
* ``triton`` -- GPU kernels, per-row gather-GEMV (vllm_griffin/ops/triton_experts.py);
* ``triton_union`` -- GPU kernels, each union neuron's weights read once for all rows
  (``experts_mlp_triton_union``); only chosen when the cost model has union constants;
* ``masked`` -- vLLM's own dense GEMMs with non-experts zeroed per row (``masked_activation_fn``);
* ``gather`` -- plain-torch reference (no kernel for this device/dtype/activation).

The cost model compares the expert kernels with the dense GEMM they replace:
each is bounded by streaming its weights or by its arithmetic, whichever is
slower. Its constants are fitted to the kernel benchmarks in ``benchmarks/``
(results in ``benchmarks/results/``), not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_griffin.ops import cpu_kernel
from vllm_griffin.ops.reference import gated_keep_reference, keep_rows_reference, valid_entries


@dataclass(frozen=True)
class CostModel:
    """Predicted times in units of "the dense GEMM streaming one neuron's three weight rows".

    dense = max(D, dense_compute * T * D)        (a GPU: streaming-bound until arithmetic-bound)
            D * (1 + dense_compute * (T - 1))  (``dense_additive``: one CPU core streams, then computes)
    rows  = overhead + rows_stream * P                      (each row streams its experts)
    union = union_overhead + max(union_stream * U, union_compute * P)   (each used neuron once;
            the sum of the two terms where streaming and arithmetic do not overlap)
    with T rows, P = sum of their expert counts, U = distinct neurons they use
    (an upper bound where the host cannot count it without a device sync).
    """

    dense_compute: float
    rows_stream: float
    union_stream: float | None      # None: no union kernel on this device
    union_compute: float = 0.0
    overhead: float = 0.0
    union_overhead: float | None = None   # None: the same as ``overhead``
    union_overlaps: bool = True     # a GPU hides loads behind arithmetic; one CPU core does one, then the other
    min_gain: float = 1.05          # predicted speed-up needed to leave vLLM's dense GEMM
    dense_additive: bool = False    # dense = D * (1 + dense_compute * (T - 1)) (see above)


# One CPU worker core, fp32, against vLLM's oneDNN GEMM, for the register-tiled union kernel
# (blocks of 16 neurons, each row's own neurons only): a conservative envelope of the per-shape
# fits over SmolLM2, Qwen2.5-0.5B and the 1B Llama shape at T = 1-32 with trained-like overlap
# (`python benchmarks/cpu_kernels.py --fit`; benchmarks/results/cpu_kernels_union_tiled*.json).
# Dense grows additively with rows here (the max form cannot fit T = 4-16). Its terms add up
# (one core streams, then computes). min_gain 1.10: small layers (SmolLM2) lose a few percent
# of the predicted gain to the kernels' per-call cost in the engine, so near-ties stay dense.
CPU_COST = CostModel(dense_compute=0.042, rows_stream=0.89, union_stream=0.82, union_compute=0.093,
                     union_overhead=60.0, union_overlaps=False, min_gain=1.10, dense_additive=True)
# H200, bf16, Llama-3-8B MLP, launches replayed from CUDA graphs; fitted to
# benchmarks/results/h200_triton_experts.json: ~21 us + 0.89x dense's time per streamed
# neuron for the per-row Triton kernel; cuBLAS stays ~96 us up to T = 8.
# The union kernel (experts_mlp_triton_union) exists but has not been timed on a GPU:
# union_stream stays None (never chosen) until `python benchmarks/gpu_kernels.py` has run
# on the H200; it prints the fitted union_stream / union_overhead / union_compute to put here.
GPU_COST = CostModel(dense_compute=0.0055, rows_stream=0.89, union_stream=None, overhead=3200.0)


def cost_model(device: torch.device) -> CostModel:
    return CPU_COST if device.type == "cpu" else GPU_COST


def predicted_times(rows: int, width: int, union: int, products: int, cost: CostModel) -> dict[str, float]:
    times = {"dense": dense_time(rows, width, cost),
             "rows": cost.overhead + cost.rows_stream * products}
    if cost.union_stream is not None and rows > 1:
        overhead = cost.overhead if cost.union_overhead is None else cost.union_overhead
        stream, compute = cost.union_stream * union, cost.union_compute * products
        times["union"] = overhead + (max(stream, compute) if cost.union_overlaps else stream + compute)
    return times


# The kernels each path name stands for, per device type.
GPU_PATHS = {"rows": "triton", "union": "triton_union"}


def dense_time(rows: int, width: int, cost: CostModel) -> float:
    if rows <= 0:
        return 0.0
    if cost.dense_additive:
        return width * (1 + cost.dense_compute * (rows - 1))
    return max(width, cost.dense_compute * rows * width)


def choose_path(device: torch.device, kernel_ok: bool, rows: int, width: int, union: int, products: int,
                cost: CostModel | None = None, dense_rows: int = 0) -> str:
    """The fastest predicted path; the expert kernels must beat dense by ``min_gain``.

    ``dense_rows``: rows of the same step that run the full MLP anyway (refresh tokens,
    prompt chunks) and whose GEMMs the masked path can share (the layer runs them as one
    pass). The weights stream once for those; the masked path then costs only the extra
    rows' arithmetic, which the expert kernels, streaming the weights a second time,
    must beat."""
    if not kernel_ok:
        return "masked" if products > width else "gather"
    cost = cost or cost_model(device)
    times = predicted_times(rows, width, union, products, cost)
    dense = times.pop("dense")
    if dense_rows:
        dense = dense_time(rows + dense_rows, width, cost) - dense_time(dense_rows, width, cost)
    best = min(times, key=times.get)
    if dense / times[best] < cost.min_gain:
        return "masked"
    if device.type == "cpu":
        return best
    return GPU_PATHS[best]


def kernel_can_win(device: torch.device, rows: int, width: int, kmax: int, products: int,
                   cost: CostModel | None = None, dense_rows: int = 0) -> bool:
    """False when even the smallest possible union (kmax) cannot beat dense (or, with
    ``dense_rows``, the shared pass of choose_path): then the union need not be counted."""
    cost = cost or cost_model(device)
    times = predicted_times(rows, width, kmax, products, cost)
    dense = times.pop("dense")
    if dense_rows:
        dense = dense_time(rows + dense_rows, width, cost) - dense_time(dense_rows, width, cost)
    return dense / min(times.values()) >= cost.min_gain


def union_size(experts: torch.Tensor, counts: torch.Tensor, width: int) -> int:
    """Distinct neurons used by the rows (CPU tensors: cheap, no device sync)."""
    if experts.shape[0] == 1:
        return int(counts[0])
    used = torch.zeros(width + 1, dtype=torch.bool, device=experts.device)
    used[torch.where(valid_entries(experts, counts), experts, width).reshape(-1)] = True
    return int(used[:width].sum())


def kernel_supports(weights, activation: str | None) -> bool:
    # The kernels run gated MLPs without biases; the rest (OPT) takes the torch paths.
    if weights is None or activation is None or not weights.gated or weights.has_bias:
        return False
    if weights.gate.device.type == "cpu":
        return cpu_kernel.supports(weights, activation)
    return weights.gate.device.type == "cuda" and activation in ("silu", "gelu_tanh", "gelu", "relu")


def masked_activation_fn(device: torch.device, dtype: torch.dtype, activation: str | None, act_and_mul):
    """The masked path's step between vLLM's two GEMMs, ``fn(gate_up, masks, slots) -> z``:
    ``act_and_mul(gate_up)`` with row t keeping only the neurons ``masks[slots[t]]``
    marks (one layer's [S, D] bool rows), the others exactly 0.

    On a CPU it is one C pass for SiLU and the GELU tanh form (activation, product and
    zeroing fused: fewer calls and passes than vLLM's own activation), otherwise vLLM's
    activation, then the C zeroing; torch elsewhere. Chosen once per layer and dtype: it
    runs per layer and step, where checks cost more than the kernel, so it trusts its
    ``slots`` (int64, rows of ``masks``; a step plan's)."""
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_kernel.load() is not None:
        if activation in cpu_kernel.FUSED_ACT_CODES:
            return cpu_kernel.act_keep_unchecked(dtype, activation)
        keep = cpu_kernel.keep_rows_unchecked(dtype)
    else:
        keep = keep_rows_reference

    def masked_activation(gate_up: torch.Tensor, masks: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return keep(act_and_mul(gate_up), masks, slots)

    return masked_activation


def gated_masked_activation_fn(device: torch.device, dtype: torch.dtype, activation: str | None, act_and_mul,
                               gated: bool):
    """:func:`masked_activation_fn` for a step with `gated` rows, ``fn(gate_up, masks, slots, ks)``:
    row t keeps the ``ks[t]`` neurons of its pool with the largest |act(gate)| (0: the whole
    pool). One C pass on a CPU for the fused activations; elsewhere the torch selection
    (reference.gated_keep_reference) and then the masked activation. ``gated``: whether
    gate_up holds [gate, up] (else it is the activation's only input, as OPT's fc1)."""
    if (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_kernel.load() is not None
            and activation in cpu_kernel.FUSED_ACT_CODES and gated):
        return cpu_kernel.gated_act_keep_unchecked(dtype, activation)
    masked = masked_activation_fn(device, dtype, activation, act_and_mul)

    def gated_masked_activation(gate_up: torch.Tensor, masks: torch.Tensor, slots: torch.Tensor,
                                ks: torch.Tensor) -> torch.Tensor:
        if gated:  # act(gate) alone, by the model's own act-and-mul with an `up` of ones
            gate = gate_up[:, :masks.shape[-1]]
            gate_act = act_and_mul(torch.cat([gate, torch.ones_like(gate)], dim=-1))
        else:
            gate_act = act_and_mul(gate_up)
        keep = gated_keep_reference(gate_act, masks, slots, ks)
        return masked(gate_up, keep, torch.arange(keep.shape[0], device=keep.device))

    return gated_masked_activation
