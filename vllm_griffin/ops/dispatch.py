"""Choose, per layer and step, how the step's decode rows run on their experts.

Paths (every one gives each row exactly its own experts' result):

* ``rows``   -- CPU kernel, each row streams its experts' weights (best for one row);
* ``union``  -- CPU kernel, each needed neuron's weights are read once for all rows;
* ``triton`` -- GPU kernels, per-row gather-GEMV (vllm_griffin/ops/triton_experts.py);
* ``masked`` -- vLLM's own dense GEMMs with non-experts zeroed per row;
* ``gather`` -- plain-torch reference (no kernel for this device/dtype/activation).

The cost model compares the expert kernel with the dense GEMM it replaces:
each is bounded by streaming its weights or by its arithmetic, whichever is
slower. Constants are throughput ratios measured by ``vllm-griffin bench``
(``benchmarks/``), not guesses; see README "Decode speed".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_griffin.ops import cpu_kernel


@dataclass(frozen=True)
class CostModel:
    """Times in units of "stream one neuron's three weight rows as the dense GEMM does".

    dense  = max(D, dense_compute * T * D)
    kernel = max(kernel_stream * streamed, kernel_compute * products)
    where ``streamed`` is the union of the rows' experts (kernels that read a
    neuron once per step) or the sum of their counts (per-row kernels), and
    ``products`` is the sum of the rows' counts.
    """

    dense_compute: float      # one row-neuron product of the dense GEMM
    kernel_stream: float      # one neuron's rows streamed by the expert kernel
    kernel_compute: float     # one row-neuron product of the expert kernel
    reads_union: bool         # weights read once per step (True) or once per row
    min_gain: float = 1.03    # below this predicted speed-up the dense path is kept


# 2-core AVX2 CPU, fp32, one worker core; from `python benchmarks/kernels.py`
# (1B shape: H=2048, D=8192): dense torch GEMM 14.8 GB/s and 52 GFLOP/s,
# union kernel 13.2 GB/s and 23 GFLOP/s.
CPU_COST = CostModel(dense_compute=0.135, kernel_stream=1.05, kernel_compute=0.30, reads_union=True)
# H200, bf16, per-row Triton kernel on CUDA cores vs cuBLAS on tensor cores
# (datasheet-level leads until the device benchmark replaces them).
GPU_COST = CostModel(dense_compute=0.0055, kernel_stream=1.25, kernel_compute=0.064, reads_union=False)


def predicted_gain(rows: int, width: int, union: int, products: int, cost: CostModel) -> float:
    """Dense time / expert-kernel time; above ``cost.min_gain`` the expert kernel runs."""
    dense = max(width, cost.dense_compute * rows * width)
    streamed = union if cost.reads_union else products
    kernel = max(cost.kernel_stream * streamed, cost.kernel_compute * products)
    return dense / max(kernel, 1e-9)


def choose_path(device: torch.device, kernel_ok: bool, rows: int, width: int, union: int, products: int) -> str:
    if not kernel_ok:
        return "masked" if products > width else "gather"
    cost = CPU_COST if device.type == "cpu" else GPU_COST
    if predicted_gain(rows, width, union, products, cost) < cost.min_gain:
        return "masked"
    if device.type == "cpu":
        return "rows" if rows == 1 else "union"
    return "triton"


def union_size(experts: torch.Tensor, counts: torch.Tensor, width: int) -> int:
    """Distinct neurons used by the rows (CPU tensors: cheap, no device sync)."""
    if experts.shape[0] == 1:
        return int(counts[0])
    valid = torch.arange(experts.shape[1], device=experts.device)[None, :] < counts[:, None]
    used = torch.zeros(width + 1, dtype=torch.bool, device=experts.device)
    used[torch.where(valid, experts, width).reshape(-1)] = True
    return int(used[:width].sum())


def kernel_supports(w_gate_up, w_down_t, activation: str | None) -> bool:
    if w_gate_up is None or w_down_t is None or activation is None:
        return False
    if w_gate_up.device.type == "cpu":
        return cpu_kernel.supports(w_gate_up, w_down_t, activation)
    return w_gate_up.device.type == "cuda" and activation in ("silu", "gelu_tanh", "gelu", "relu")
