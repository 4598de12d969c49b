"""The CUDA-graph-safe decode path (vllm_griffin/graph_decode.py), checked on the CPU.

A CUDA graph replays recorded kernels on fixed addresses. Here torch.compile
with ``fullgraph=True`` stands in for the capture: it fails on any host sync
or data-dependent branch, and a change of buffer address or shape would show
as a recompilation. Between "replays" only the buffers' contents change, as
``GraphDecode.fill`` writes them; every row must get exactly its own experts.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from vllm_griffin.core.config import GriffinConfig
from vllm_griffin.core.state import GriffinState, StepRow
from vllm_griffin.engine.graph_decode import GraphDecode
from vllm_griffin.ops import ExpertWeights, experts_mlp_gather, masked_activation_fn

LAYERS, HIDDEN, WIDTH = 3, 16, 40


def silu_and_mul(h):
    d = h.shape[-1] // 2
    return F.silu(h[..., :d]) * h[..., d:]


def make_mlps(seed=0):
    gen = torch.Generator().manual_seed(seed)
    mlps = []
    for layer in range(LAYERS):
        w_gate_up = torch.randn(2 * WIDTH, HIDDEN, generator=gen)
        w_down = torch.randn(HIDDEN, WIDTH, generator=gen) / WIDTH**0.5
        weights = ExpertWeights.separate(w_gate_up, w_down.t().contiguous())
        mlps.append(types.SimpleNamespace(
            layer_index=layer, expert_weights=weights, activation="silu", down=types.SimpleNamespace(),
            _gate_up_fn=lambda x, w=w_gate_up: (x @ w.t(), None),
            _act_fn=silu_and_mul,
            _down_fn=lambda h, w=w_down: (h @ w.t(), None)))
    return mlps


def prompt_z(req_seed: int, tokens: int) -> torch.Tensor:
    """Synthetic activations [L, tokens, D] of a request's prompt (what the MLPs would capture)."""
    return torch.randn(LAYERS, tokens, WIDTH, generator=torch.Generator().manual_seed(req_seed)).relu()


def prefill(state: GriffinState, requests: dict[str, tuple[int, float]]) -> None:
    """Run every request's whole prompt in one step and select its experts."""
    rows = [StepRow(req_id=rid, prompt_len=plen, num_computed=0, num_scheduled=plen,
                    extra_args={"griffin_density": density}) for rid, (plen, density) in requests.items()]
    plan = state.plan_step(rows)
    z = torch.cat([prompt_z(ord(rid[0]), plen) for rid, (plen, _) in requests.items()], dim=1)
    for layer in range(LAYERS):
        state.capture(layer, z[layer], plan)
    state.finish_step(plan)


def decode_plan(state: GriffinState, order: list[str]):
    rows = []
    for rid in order:
        req = state.requests[rid]
        rows.append(StepRow(req_id=rid, prompt_len=req.prompt_len, num_computed=req.prompt_len + 3, num_scheduled=1))
    return state.plan_step(rows)


def expected(mlps, state, order, x):
    """Each row through its own experts (the torch reference), one row at a time."""
    outs = []
    for row, rid in enumerate(order):
        per_layer = []
        for mlp in mlps:
            req = state.requests[rid]
            if req.dense:
                experts = torch.arange(WIDTH).unsqueeze(0)
            else:
                experts = state.experts_of(rid)[mlp.layer_index].long().unsqueeze(0)
            counts = torch.tensor([experts.shape[1]])
            per_layer.append(experts_mlp_gather(x[row: row + 1], mlp.expert_weights, experts, counts, silu_and_mul))
        outs.append(torch.stack(per_layer))
    return torch.cat(outs, dim=1)  # [L, rows, H]


@pytest.mark.parametrize("path", ["masked", "gather"])
def test_buffers_replay_each_rows_experts_without_recompiling(path):
    mlps = make_mlps()
    state = GriffinState(GriffinConfig(density=0.5, method="topk"), LAYERS, WIDTH, torch.device("cpu"), max_seqs=2)
    padded = 8
    state.graph = graph = GraphDecode(state, max_rows=padded, kernel_rows=padded)
    compiles = 0

    def backend(gm, example_inputs):
        nonlocal compiles
        compiles += 1
        return gm.forward

    @torch.compile(backend=backend, fullgraph=True, dynamic=False)
    def step(x):
        return torch.stack([graph.forward(mlp, x, path) for mlp in mlps])

    graph.paths[padded] = path
    step(torch.zeros(padded, HIDDEN))  # the "capture", before any request exists
    buffers = (graph.row_masks.data_ptr(), graph.row_experts.data_ptr(), graph.row_counts.data_ptr())
    # Odd k (density 0.3 of 40 = 12, 0.55 -> 22, 0.9 -> 36), a dense request, and more
    # requests than the two slots the state started with (the tables grow; the buffers don't).
    requests = {"a": (9, 0.3), "b": (5, 0.55), "c": (7, 0.9), "d": (4, 1.0), "e": (6, 0.5)}
    prefill(state, requests)
    assert state.slots.capacity > 2
    gen = torch.Generator().manual_seed(3)
    # Rows move between steps, requests leave and join, and the batch is padded to 8.
    for order in (["a", "b", "c"], ["c", "a"], ["e", "d", "b", "a", "c"], ["d"], ["b", "e", "a", "c", "d"]):
        plan = decode_plan(state, order)
        assert graph.fill(plan, padded)
        x = torch.randn(padded, HIDDEN, generator=gen)
        out = step(x)
        n = len(order)
        torch.testing.assert_close(out[:, :n], expected(mlps, state, order, x), rtol=1e-4, atol=1e-4)
        # Padded rows are the trash row: nothing kept, nothing added.
        assert torch.count_nonzero(out[:, n:]) == 0
    assert compiles == 1, "a buffer moved or a shape changed between replays"
    assert buffers == (graph.row_masks.data_ptr(), graph.row_experts.data_ptr(), graph.row_counts.data_ptr())
    assert graph.fills == 5


def test_steps_with_prompt_tokens_or_without_a_graph_are_not_filled():
    state = GriffinState(GriffinConfig(density=0.5, method="topk"), LAYERS, WIDTH, torch.device("cpu"), max_seqs=4)
    state.graph = graph = GraphDecode(state, max_rows=8, kernel_rows=4)
    graph.paths[4] = "gather"
    prefill(state, {"a": (6, 0.5)})
    # A new request's prompt beside a decode row: the statistic needs the host path.
    mixed = state.plan_step([
        StepRow(req_id="a", prompt_len=6, num_computed=7, num_scheduled=1),
        StepRow(req_id="n", prompt_len=3, num_computed=0, num_scheduled=3)])
    assert not graph.fill(mixed, 4)
    assert not graph.fill(decode_plan(state, ["a"]), 2)  # no graph was captured for 2 rows
    assert graph.fill(decode_plan(state, ["a"]), 4)


def test_path_per_captured_size_is_fixed_and_priced_at_the_engine_density():
    state = GriffinState(GriffinConfig(density=0.5, method="topk"), LAYERS, WIDTH, torch.device("cpu"), max_seqs=4)
    graph = GraphDecode(state, max_rows=64, kernel_rows=16)
    assert graph.path_for(1, True, torch.device("cpu")) == "gather"   # one row: the kernel wins
    assert graph.path_for(32, True, torch.device("cpu")) == "masked"  # beyond kernel_rows
    assert graph.path_for(2, False, torch.device("cpu")) == "masked"  # no kernel for this MLP
    graph.paths[1] = "gather"
    assert graph.path_for(1, False, torch.device("cpu")) == "gather"  # recorded once, kept


GRAPH_TRITON_CHECK = r"""
import torch
from tests.test_graph_decode import HIDDEN, GraphDecode, GriffinConfig, GriffinState, decode_plan, expected, make_mlps, prefill
worst = 0.0
for path in ("triton", "triton_union"):
    mlps = make_mlps()
    state = GriffinState(GriffinConfig(density=0.5, method="topk"), 3, 40, torch.device("cpu"), max_seqs=4)
    state.graph = graph = GraphDecode(state, max_rows=8, kernel_rows=8)
    graph.paths[8] = path
    prefill(state, {"a": (9, 0.3), "b": (5, 0.55), "c": (7, 0.9), "d": (4, 1.0)})
    for order in (["c", "a", "d"], ["b", "d", "a", "c"]):
        assert graph.fill(decode_plan(state, order), 8)
        x = torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(len(order)))
        out = torch.stack([graph.forward(mlp, x) for mlp in mlps])
        want = expected(mlps, state, order, x)
        worst = max(worst, ((out[:, :len(order)] - want).abs().max() / want.abs().max()).item())
        assert torch.count_nonzero(out[:, len(order):]) == 0, path
print("WORST", worst)
"""


def test_graph_paths_on_the_triton_kernels_in_the_interpreter():
    """The GPU paths a graph records (per-row kernel at full capacity, union kernel on the row masks)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", GRAPH_TRITON_CHECK], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split("WORST")[-1]) < 1e-5


def test_union_from_masks_equals_union_of_expert_lists():
    """The eager dispatch counts a step's union from the one-byte masks (GriffinState.sparse_union)."""
    from vllm_griffin.ops import union_size

    state = GriffinState(GriffinConfig(density=0.5, method="topk"), LAYERS, WIDTH, torch.device("cpu"), max_seqs=4)
    prefill(state, {"a": (9, 0.3), "b": (5, 0.55), "c": (7, 0.9), "e": (6, 0.5)})
    for order in (["a"], ["b", "a"], ["e", "c", "a", "b"]):
        plan = decode_plan(state, order)
        # ... and on a GPU from packed host copies made at selection (no device sync per step).
        state._keep_host_bits([state.requests[r] for r in order])
        host = state.host_unions(plan.sparse_req_slots_host)
        for layer in range(LAYERS):
            want = union_size(*state.sparse_experts(layer, plan), WIDTH)
            assert state.sparse_union(layer, plan) == want
            assert host[layer] == want
            # The step's masks, gathered once for all layers, are each row's own experts.
            masks = state.sparse_masks(layer, plan)
            experts, counts = state.sparse_experts(layer, plan)
            for row in range(masks.shape[0]):
                assert masks[row].nonzero().flatten().tolist() == experts[row, : counts[row]].tolist()
            # The masked GEMM path zeroes exactly the other neurons of each row.
            for dtype in (torch.float32, torch.bfloat16):
                gate_up = torch.randn(masks.shape[0], 2 * WIDTH, dtype=dtype).add_(5.0)  # no zeros of its own
                for activation in ("silu", None):  # fused with the activation, and not
                    act = masked_activation_fn(torch.device("cpu"), dtype, activation, silu_and_mul)
                    assert torch.equal(act(gate_up, state.masks[layer], plan.sparse_slot) != 0, masks)
