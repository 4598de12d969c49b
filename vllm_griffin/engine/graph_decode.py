"""Decode rows inside a captured CUDA graph.

A captured graph replays the kernels it recorded, with the same tensor
addresses and shapes, and none of the Python that chose them. GRIFFIN's eager
decode path (``GriffinMLP._run_experts``) decides per step on the host, so a
graph would replay one step's experts forever. This path is what a graph may
hold instead:

* every decode token row reads its experts from persistent per-row buffers
  (:class:`GraphDecode`), which the model state fills *before* each replay
  from the expert tables (device copies only, no host sync); the tables
  themselves may grow, the buffers never move;
* padded rows (a batch of 5 replays the graph for 8) get the trash row: no
  experts, count 0, mask all False, so they compute nothing that matters;
* each captured batch size keeps one path, chosen when it is captured
  (the per-row expert kernel for few rows, the union-tiled kernel where the
  cost model prices it, vLLM's GEMMs with per-row masks beyond);
  every path gives each row exactly its own experts' result, so the choice
  only moves speed;
* the kernel runs with a static expert capacity (all ``D`` neurons); rows
  stop at their own count, read on the device.

Prompt tokens never reach a graph: their statistic is captured on the host
path, so a batch holding any prompt token runs piecewise or eager (see
``runner_v2.keep_prompts_off_full_graphs``). A dense request (density 1.0)
decoding in a graph takes all neurons.
"""

from __future__ import annotations

import torch

from vllm_griffin import ops

# The expert kernel runs up to this many rows in a graph; larger graphs use the
# masked GEMMs (the kernel's per-row streams would exceed dense's traffic anyway).
KERNEL_ROWS = 16


def in_full_graph() -> bool:
    """True while vLLM runs (captures) a FULL CUDA graph of the whole model."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return is_forward_context_available() and get_forward_context().cudagraph_runtime_mode == CUDAGraphMode.FULL


class GraphDecode:
    """Per-row buffers a captured decode graph reads, and each captured size's path.

    ``max_rows``: the largest batch (in tokens) a FULL graph is captured for.
    ``kernel_rows``: the largest batch that may use the expert kernel.
    """

    def __init__(self, state, max_rows: int, kernel_rows: int = KERNEL_ROWS):
        layers, width, device = state.num_layers, state.width, state.device
        self.state = state
        self.max_rows = max_rows
        self.kernel_rows = min(kernel_rows, max_rows)
        # [layer, row, neuron] which neurons each token row keeps (masked path).
        self.row_masks = torch.zeros(layers, max_rows, width, dtype=torch.bool, device=device)
        # [layer, row, :count] each token row's experts, and the counts (kernel path).
        self.row_experts = torch.zeros(layers, self.kernel_rows, width, dtype=torch.int32, device=device)
        self.row_counts = torch.zeros(layers, self.kernel_rows, dtype=torch.int32, device=device)
        self._all_neurons = torch.arange(width, dtype=torch.int32, device=device)
        # Rows of a captured graph -> the path it recorded.
        self.paths: dict[int, str] = {}
        self.fills = 0

    # -- before a replay (host side, device copies only) ------------------------------------

    def fill(self, plan, padded_rows: int) -> bool:
        """Write this step's rows into the buffers of the graph for ``padded_rows``.

        Returns False (nothing written) when no graph of that size exists or the
        step holds prompt tokens (it cannot run as a graph)."""
        path = self.paths.get(padded_rows)
        if path is None or plan.capture_pos is not None or plan.num_tokens > padded_rows:
            return False
        n = plan.num_tokens
        if plan.sparse_idx is None:  # every token is dense (density 1.0 requests)
            sparse_idx = sparse_slot = None
            dense_idx = torch.arange(n, device=self.state.device)
        else:
            sparse_idx, sparse_slot, dense_idx = plan.sparse_idx, plan.sparse_slot, plan.dense_idx
        if path in ("masked", "triton_union"):
            masks = self.row_masks[:, :padded_rows]
            masks.zero_()  # padded rows: the trash row, nothing kept
            if sparse_idx is not None:
                masks[:, sparse_idx] = self.state.masks[:, sparse_slot]
            if dense_idx is not None and dense_idx.numel():
                masks[:, dense_idx] = True
        else:
            experts, counts = self.row_experts[:, :padded_rows], self.row_counts[:, :padded_rows]
            counts.zero_()
            if sparse_idx is not None:
                experts[:, sparse_idx] = self.state.experts[:, sparse_slot]
                counts[:, sparse_idx] = torch.stack(plan.sparse_counts).to(torch.int32)
            if dense_idx is not None and dense_idx.numel():
                experts[:, dense_idx] = self._all_neurons
                counts[:, dense_idx] = self.state.width
        self.fills += 1
        return True

    # -- inside the graph -------------------------------------------------------------------

    def path_for(self, rows: int, kernel_ok: bool, device: torch.device) -> str:
        """The path a graph of ``rows`` token rows records (fixed once chosen)."""
        path = self.paths.get(rows)
        if path is None:
            path = "masked"
            if kernel_ok:
                # Priced at the engine's own density, with the largest union those rows
                # can have; per-request densities only move speed.
                k = sum(self.state.layer_densities) / self.state.num_layers * self.state.width
                products = int(rows * k)
                union = min(self.state.width, products)
                chosen = ops.choose_path(device, kernel_ok, rows, self.state.width, union, products)
                if chosen == "triton_union":  # reads the row masks: any row count
                    path = chosen
                elif chosen != "masked" and rows <= self.kernel_rows:
                    path = "triton" if device.type == "cuda" else "gather"
            self.paths[rows] = path
        return path

    def forward(self, mlp, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """``mlp`` (a GriffinMLP) on the buffered rows: static shapes, no host sync.
        ``path`` overrides the size's recorded path (tests)."""
        rows, layer = x.shape[0], mlp.layer_index
        if rows > self.max_rows:
            raise RuntimeError(f"GRIFFIN: a graph of {rows} rows exceeds the {self.max_rows} rows buffered")
        if path is None:
            kernel_ok = ops.kernel_supports(mlp.expert_weights, mlp.activation) or x.device.type == "cpu"
            path = self.path_for(rows, kernel_ok, x.device)
        if path == "masked":
            gate_up, _ = mlp._gate_up_fn(x)
            z = mlp._act_fn(gate_up)
            out, _ = mlp._down_fn(z * self.row_masks[layer, :rows])
            return out
        if path == "triton_union":  # each union neuron's weights once for all rows, masked per row
            from vllm_griffin.ops.triton_experts import experts_mlp_triton_union

            out = experts_mlp_triton_union(x, mlp.expert_weights, None, None, mlp.activation,
                                           masks=self.row_masks[layer, :rows])
            return reduce_tp(mlp, out)
        experts, counts = self.row_experts[layer, :rows], self.row_counts[layer, :rows]
        if path == "triton":
            from vllm_griffin.ops.triton_experts import experts_mlp_triton

            out = experts_mlp_triton(x, mlp.expert_weights, experts, counts, mlp.activation)
        else:  # the plain-torch reference (CPU tests)
            out = ops.experts_mlp_gather(x, mlp.expert_weights, experts.long(), counts, mlp._act_fn).to(x.dtype)
        return reduce_tp(mlp, out)


def reduce_tp(mlp, out: torch.Tensor) -> torch.Tensor:
    # The expert kernels skip vLLM's row-parallel linear, so its reduction too.
    if getattr(mlp.down, "tp_size", 1) > 1 and getattr(mlp.down, "reduce_results", True):
        from vllm.distributed import tensor_model_parallel_all_reduce

        out = tensor_model_parallel_all_reduce(out)
    return out
