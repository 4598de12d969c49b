"""GRIFFIN's Model Runner V2 hooks (vllm_griffin/runner_v2.py), at the state level on the CPU.

V2 runs only on CUDA, so its runner cannot start here. These tests drive
GRIFFIN's model-state hooks with V2's own data classes (InputBatch,
NewRequestData, BatchReqState) through a request's life: chunked prompts,
rows that move, a graph-padded decode batch, preemption and resume, finish.
The experts are checked against the statistic computed here from the same
activations.
"""

from __future__ import annotations

import dataclasses
import inspect
import types

import numpy as np
import pytest
import torch

from vllm_griffin.core import algorithm
from vllm_griffin.core.config import GriffinConfig
from vllm_griffin.core.state import GriffinState
from vllm_griffin.engine.runner_v2 import (
    GriffinModelStateMixin,
    GriffinRunnerV2Mixin,
    griffin_model_state_cls,
    keep_prompts_off_full_graphs,
)

v2_input_batch = pytest.importorskip("vllm.v1.worker.gpu.input_batch")
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.sched.output import NewRequestData  # noqa: E402
from vllm.v1.worker.gpu.model_runner import BatchReqState  # noqa: E402
from vllm.v1.worker.gpu.model_states.default import DefaultModelState  # noqa: E402

LAYERS, WIDTH = 2, 24


class _VllmState:
    """Stands in for vLLM's DefaultModelState (which needs a whole VllmConfig): records calls."""

    def __init__(self, vllm_config, model, encoder_cache, device):
        self.calls = []

    def add_request(self, req_index, new_req_data):
        self.calls.append(("add", new_req_data.req_id))

    def remove_request(self, req_id):
        self.calls.append(("remove", req_id))

    def prepare_inputs(self, input_batch, req_states):
        self.calls.append(("prepare", tuple(input_batch.req_ids)))
        return {}

    def postprocess_state(self, idx_mapping, num_sampled, num_computed_tokens=None):
        self.calls.append(("postprocess",))


def _config(graphs: bool):
    from vllm.config.compilation import CUDAGraphMode

    return types.SimpleNamespace(
        model_config=types.SimpleNamespace(enforce_eager=not graphs),
        compilation_config=types.SimpleNamespace(
            cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE if graphs else CUDAGraphMode.NONE,
            max_cudagraph_capture_size=8))


def _model_state(graphs=True):
    griffin = GriffinState(GriffinConfig(density=0.5, method="topk"), LAYERS, WIDTH, torch.device("cpu"), max_seqs=4)
    model = types.SimpleNamespace(griffin_state=griffin)
    cls = griffin_model_state_cls(_VllmState)
    return cls(_config(graphs), model, None, torch.device("cpu")), griffin


def _new_request(req_id, prompt_len, density=None, outputs=0):
    extra = None if density is None else {"griffin": {"density": density}}
    tokens = list(range(1, prompt_len + 1))
    return NewRequestData(req_id=req_id, prompt_token_ids=tokens, mm_features=[],
                          sampling_params=SamplingParams(max_tokens=8, extra_args=extra), pooling_params=None,
                          block_ids=([0],), num_computed_tokens=0, lora_request=None,
                          prefill_token_ids=tokens + list(range(900, 900 + outputs)))


def _batch(rows, padded=None):
    """A V2 InputBatch for rows (req_id, num_computed, num_scheduled), in batch order."""
    num_tokens = sum(n for _, _, n in rows)
    buffers = v2_input_batch.InputBuffers(max_num_reqs=8, max_num_tokens=64, device=torch.device("cpu"))
    batch = v2_input_batch.InputBatch.make_dummy(len(rows), num_tokens, buffers)
    return dataclasses.replace(
        batch, req_ids=[r for r, _, _ in rows],
        num_scheduled_tokens=np.array([n for _, _, n in rows], dtype=np.int32),
        num_computed_tokens_np=np.array([c for _, c, _ in rows], dtype=np.int32),
        num_tokens_after_padding=padded or num_tokens)


def _z(req_id: str, positions: range) -> torch.Tensor:
    """Deterministic activations [L, len, D] of a request's prompt positions."""
    out = []
    for p in positions:
        gen = torch.Generator().manual_seed(1000 * ord(req_id[-1]) + p)
        out.append(torch.randn(LAYERS, WIDTH, generator=gen).relu())
    return torch.stack(out, dim=1)


def _forward(griffin: GriffinState, rows) -> None:
    """What the GriffinMLPs do with the step's prompt tokens: capture their activations."""
    from vllm_griffin.engine import layers

    plan = layers._ACTIVE_PLAN
    if plan is None or plan.capture_pos is None:
        return
    z = torch.cat([_z(r, range(c, c + n)) for r, c, n in rows], dim=1)
    dense = z if plan.dense_idx is None else z[:, plan.dense_idx]
    for layer in range(LAYERS):
        griffin.capture(layer, dense[layer], plan)


def _step(state, griffin, rows, padded=None):
    state.prepare_inputs(_batch(rows, padded), req_states=None)
    _forward(griffin, rows)
    state.postprocess_state(None, None)


def _oracle(req_id, prompt_len, density):
    z = _z(req_id, range(prompt_len))
    k = algorithm.num_experts(density, WIDTH)
    return [algorithm.topk_experts_batched(algorithm.prompt_contributions(z[layer]).sum(0, keepdim=True), k)[0]
            .to(torch.int32) for layer in range(LAYERS)]


class _V2Runner:
    """The part of V2's runner GRIFFIN hooks: finish_requests removes finished *and*
    preempted requests from the model state (vllm/v1/worker/gpu/model_runner.py)."""

    def __init__(self, model_state):
        self.model_state = model_state

    def finish_requests(self, scheduler_output):
        for req_id in sorted(scheduler_output.finished_req_ids | scheduler_output.preempted_req_ids):
            self.model_state.remove_request(req_id)


def test_a_requests_life_on_model_runner_v2():
    state, griffin = _model_state()
    runner = type("Runner", (GriffinRunnerV2Mixin, _V2Runner), {})(state)
    state.add_request(0, _new_request("r1", 10))
    state.add_request(1, _new_request("r2", 6, density=0.25))
    # Chunked prompts: r2 completes, r1 not yet.
    _step(state, griffin, [("r1", 0, 6), ("r2", 0, 6)])
    assert griffin.requests["r2"].selected and not griffin.requests["r1"].selected
    # Rows swap; r2 decodes while r1's last chunk is a single prompt token's worth of 4.
    _step(state, griffin, [("r2", 6, 1), ("r1", 6, 4)])
    for rid, plen, density in (("r1", 10, 0.5), ("r2", 6, 0.25)):
        got = griffin.experts_of(rid)
        for layer, want in enumerate(_oracle(rid, plen, density)):
            assert torch.equal(got[layer], want)
    # A decode batch of 2 padded to a captured graph of 4 rows: the buffers carry each row's experts.
    griffin.graph.paths[4] = "gather"
    _step(state, griffin, [("r1", 10, 1), ("r2", 7, 1)], padded=4)
    assert griffin.graph.fills == 1
    for row, rid in enumerate(("r1", "r2")):
        k = griffin.requests[rid].k[0]
        assert int(griffin.graph.row_counts[0, row]) == k
        assert torch.equal(griffin.graph.row_experts[0, row, :k].sort().values, griffin.experts_of(rid)[0].sort().values)
    assert griffin.graph.row_counts[:, 2:].eq(0).all()  # padded rows: the trash row
    # Preemption: V2 removes r1 from its own state; GRIFFIN keeps r1's experts ...
    before = griffin.experts_of("r1")
    runner.finish_requests(types.SimpleNamespace(finished_req_ids=set(), preempted_req_ids={"r1"}))
    assert ("remove", "r1") in state.calls and "r1" in griffin.requests
    # ... and the resumed request (prompt + 2 outputs recomputed) runs on them, no new selection.
    state.add_request(0, _new_request("r1", 10, outputs=2))
    _step(state, griffin, [("r1", 0, 12)])
    assert all(torch.equal(a, b) for a, b in zip(before, griffin.experts_of("r1")))
    assert griffin.restarts == 1
    # Finish: only now is the slot freed.
    runner.finish_requests(types.SimpleNamespace(finished_req_ids={"r1", "r2"}, preempted_req_ids=set()))
    assert griffin.slots_in_use == 0 and not state.griffin_requests


def test_dummy_batches_run_vllms_own_mlp():
    from vllm_griffin.engine import layers

    state, griffin = _model_state(graphs=False)
    assert griffin.graph is None  # eager: no graph buffers
    state.prepare_inputs(_batch([("req_0_dummy", 0, 4)]), req_states=None)
    assert layers._ACTIVE_PLAN is None and not griffin.requests
    state.postprocess_state(None, None)


def test_prompt_tokens_keep_a_step_off_full_graphs():
    def batch_state(prefilling):
        return BatchReqState(
            req_ids=["a", "b"], num_scheduled_tokens=np.array([1, 1]), num_tokens=2, num_draft_tokens_np=None,
            idx_mapping_np=np.arange(2), prefill_len_np=np.array([5, 9]),
            num_computed_prefill_tokens_np=np.array([5, 8 if prefilling else 9]),
            is_prefilling_np=np.array([False, prefilling]), max_seq_len_np=None, has_prefill=prefilling,
            prefill_runs_as_decode_np=np.array([False, prefilling]) if prefilling else None,
            decode_graph_eligible=True)

    # b's last prompt token would replay a decode graph in V2; GRIFFIN must capture it.
    held, uniform = keep_prompts_off_full_graphs(batch_state(True), 1)
    assert uniform is None and not held.decode_graph_eligible
    decode = batch_state(False)
    assert keep_prompts_off_full_graphs(decode, 1) == (decode, 1)
    assert keep_prompts_off_full_graphs(None, 1) == (None, 1)  # dummy runs


def test_hooks_match_vllms_model_state_signatures():
    cls = griffin_model_state_cls(DefaultModelState)
    assert cls.__mro__[1] is GriffinModelStateMixin and issubclass(cls, DefaultModelState)
    for name in ("add_request", "prepare_inputs", "postprocess_state"):
        ours = list(inspect.signature(getattr(GriffinModelStateMixin, name)).parameters)
        theirs = list(inspect.signature(getattr(DefaultModelState, name)).parameters)
        assert ours == theirs or ours[-2:] == ["args", "kwargs"], (name, ours, theirs)
    init = list(inspect.signature(DefaultModelState.__init__).parameters)
    assert init[:3] == ["self", "vllm_config", "model"]
