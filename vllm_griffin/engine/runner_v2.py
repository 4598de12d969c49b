"""GRIFFIN in vLLM's Model Runner V2 (the CUDA default), with CUDA graphs.

Model Runner V2 asks the model for its per-step state object
(``model.get_model_state_cls()``, see ``vllm/v1/worker/gpu/model_states``);
GRIFFIN's model class answers with :func:`griffin_model_state_cls`, vLLM's own
default state plus these hooks:

* ``add_request``     -- remember the request's prompt length and GRIFFIN options;
* ``prepare_inputs``  -- runs before every forward pass (eager, piecewise or a
  FULL graph replay): plans the step (:meth:`GriffinState.plan_step`), makes
  the plan the one the layers read, and fills the decode graphs' buffers;
* ``postprocess_state`` -- after the step: commits captures, selects experts.

Two runner hooks complete it (:class:`GriffinRunnerV2Mixin`): a request is
released when the scheduler reports it finished (V2's own ``remove_request``
also runs for preempted requests, whose experts must stay for the resume), and
:func:`keep_prompts_off_full_graphs` -- V2 replays a
decode graph also for a prompt row with one new token, but prompt tokens feed
the statistic on the host path, so such a step runs piecewise or eager.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from vllm_griffin.core.state import StepRow

logger = logging.getLogger("vllm.griffin.runner_v2")


@dataclass
class _Request:
    prompt_len: int
    extra_args: Any
    seed: int | None


class GriffinModelStateMixin:
    """GRIFFIN's hooks on a Model Runner V2 ``ModelState`` (mixed in before vLLM's class)."""

    def __init__(self, vllm_config, model, *args, **kwargs):
        super().__init__(vllm_config, model, *args, **kwargs)
        self.griffin = model.griffin_state
        self.griffin.token_ids_visible = False  # the loop guard would need the output's token ids
        self.griffin_requests: dict[str, _Request] = {}
        self._griffin_plan = None
        compilation = vllm_config.compilation_config
        if not vllm_config.model_config.enforce_eager and compilation.cudagraph_mode.has_full_cudagraphs():
            from vllm_griffin.engine.graph_decode import GraphDecode

            self.griffin.graph = GraphDecode(self.griffin, max_rows=compilation.max_cudagraph_capture_size)

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        params = new_req_data.sampling_params
        self.griffin_requests[new_req_data.req_id] = _Request(
            prompt_len=new_req_data.prompt_len,
            extra_args=getattr(params, "extra_args", None),
            seed=getattr(params, "seed", None))

    def griffin_release(self, req_id: str) -> None:
        """The request finished or was aborted (not preempted): free its slot."""
        self.griffin_requests.pop(req_id, None)
        self.griffin.release(req_id)

    def prepare_inputs(self, input_batch, req_states) -> dict[str, Any]:
        from vllm_griffin.engine.layers import set_active_plan

        self._griffin_finish()  # a step whose postprocess never came (no sampling)
        if not all(req_id in self.griffin_requests for req_id in input_batch.req_ids[: input_batch.num_reqs]):
            set_active_plan(None)  # a dummy batch (profiling, warm-up): vLLM's own MLP
            return super().prepare_inputs(input_batch, req_states)
        plan = self.griffin.plan_step(step_rows_v2(input_batch, self.griffin_requests))
        if self.griffin.graph is not None:
            self.griffin.graph.fill(plan, input_batch.num_tokens_after_padding)
        set_active_plan(plan)
        self._griffin_plan = plan
        return super().prepare_inputs(input_batch, req_states)

    def postprocess_state(self, *args, **kwargs) -> None:
        super().postprocess_state(*args, **kwargs)
        self._griffin_finish()

    def _griffin_finish(self) -> None:
        plan, self._griffin_plan = self._griffin_plan, None
        if plan is not None:
            from vllm_griffin.engine.layers import set_active_plan

            set_active_plan(None)
            self.griffin.finish_step(plan)


def step_rows_v2(input_batch, requests: dict[str, _Request]) -> list[StepRow]:
    """The step's rows from Model Runner V2's InputBatch (batch order = token order)."""
    rows = []
    for i in range(input_batch.num_reqs):
        req_id = input_batch.req_ids[i]
        req = requests[req_id]
        rows.append(StepRow(
            req_id=req_id,
            prompt_len=req.prompt_len,
            num_computed=int(input_batch.num_computed_tokens_np[i]),
            num_scheduled=int(input_batch.num_scheduled_tokens[i]),
            extra_args=req.extra_args,
            seed=req.seed,
        ))
    return rows


@functools.cache
def griffin_model_state_cls(base: type) -> type:
    """vLLM's ModelState class ``base`` with GRIFFIN's hooks."""
    return type(f"Griffin{base.__name__}", (GriffinModelStateMixin, base), {"__module__": __name__})


def default_model_state_cls() -> type:
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    return DefaultModelState


def keep_prompts_off_full_graphs(batch_state, uniform_token_count):
    """(batch state, uniform decode token count) for the graph dispatch, with no
    FULL decode graph for a step that holds prompt tokens."""
    if batch_state is None or not batch_state.has_prefill:
        return batch_state, uniform_token_count
    return batch_state._replace(decode_graph_eligible=False), None


class GriffinRunnerV2Mixin:
    """Hooks on one Model Runner V2 instance (the worker mixes this in)."""

    def finish_requests(self, scheduler_output) -> None:
        super().finish_requests(scheduler_output)
        state = getattr(self, "model_state", None)
        if isinstance(state, GriffinModelStateMixin):
            # V2 removes preempted requests from its own state as well (and calls
            # remove_request again when one comes back); GRIFFIN frees a request only
            # when it is finished, so a resumed request keeps its experts.
            for req_id in scheduler_output.finished_req_ids:
                state.griffin_release(req_id)

    def gather_batch_req_state(self, scheduler_output, dummy_run: bool):
        batch_state, uniform = super().gather_batch_req_state(scheduler_output, dummy_run)
        if isinstance(getattr(self, "model_state", None), GriffinModelStateMixin):
            return keep_prompts_off_full_graphs(batch_state, uniform)
        return batch_state, uniform
