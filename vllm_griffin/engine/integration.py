"""How GRIFFIN plugs into vLLM.

``register()`` (the ``vllm.general_plugins`` entry point, run in every vLLM
process) installs exactly one hook: a wrapper around
``EngineArgs.create_engine_config``. Engines without a ``griffin`` key in
``additional_config`` pass straight through it and are plain vLLM.

For a GRIFFIN engine the wrapper
  * validates the config (errors name the key, the value and what is allowed),
  * keeps prefix caching exact: the scheduler shares only KV blocks made of
    prompt tokens (:class:`GriffinScheduler`), and each block carries its
    tokens' statistic rows, so a hit selects the experts a full prefill would,
  * checks the architecture and the model runner,
  * points ``parallel_config.worker_cls`` at :class:`GriffinWorker`, which
    builds the platform's own worker and gives *that instance's* model runner
    the :class:`GriffinRunnerMixin` (load_model, _model_forward, request removal),
  * makes the front end reject bad per-request ``extra_args`` before they run.
"""

from __future__ import annotations

import functools
import logging
import os

from vllm_griffin.core.architectures import spec_for
from vllm_griffin.core.config import GriffinConfig
from vllm_griffin.engine.compat import compat_error

logger = logging.getLogger("vllm.griffin")

# Private key beside "griffin" in additional_config: the worker class GriffinWorker wraps.
BASE_WORKER_KEY = "_griffin_base_worker_cls"
# ... and the scheduler class GriffinScheduler builds (None: vLLM's default).
BASE_SCHEDULER_KEY = "_griffin_base_scheduler_cls"

_REQUIRED_RUNNER_ATTRS = ("load_model", "_model_forward", "_on_request_state_removed", "input_batch",
                          "query_start_loc", "requests", "get_model")


# Model Runner V2 (vllm/v1/worker/gpu/model_runner.py): GRIFFIN's model state does the rest.
_REQUIRED_RUNNER_V2_ATTRS = ("finish_requests", "gather_batch_req_state", "load_model")


def register() -> None:
    """Entry point of the ``griffin`` general plugin; safe to call many times."""
    from vllm_griffin.engine.compat import PLUGIN_LOAD_HOOKS, missing_hooks

    missing = missing_hooks(PLUGIN_LOAD_HOOKS)
    if missing:
        # Plain vLLM must keep working: warn here; a GRIFFIN engine cannot be configured.
        logger.warning("%s", compat_error(", ".join(missing)))
        return
    from vllm.engine.arg_utils import EngineArgs

    from vllm_griffin.engine.serving import install_cli_hooks

    install_cli_hooks()  # `vllm serve --plugin griffin [--griffin-density D]`
    original = EngineArgs.create_engine_config
    if getattr(original, "_griffin_wrapped", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        cfg = GriffinConfig.from_additional_config(self.additional_config)
        if cfg is None:
            return original(self, *args, **kwargs)
        return _create_griffin_engine_config(self, original, cfg, *args, **kwargs)

    create_engine_config._griffin_wrapped = True
    EngineArgs.create_engine_config = create_engine_config


def _create_griffin_engine_config(engine_args, original, cfg: GriffinConfig, *args, **kwargs):
    from vllm_griffin.engine.compat import missing_hooks

    missing = missing_hooks()
    if missing:  # before anything starts: name the vLLM version and every missing hook
        raise compat_error(", ".join(missing))
    graphs = _use_cuda_graphs(cfg)
    if graphs:
        from vllm_griffin.engine.compat import GRAPH_HOOKS

        missing = missing_hooks(GRAPH_HOOKS)
        if missing:
            raise compat_error(", ".join(missing))
        _prefer_v2_runner(engine_args)
    else:
        _prefer_v1_runner()
        _no_cuda_graphs_yet(engine_args)
    _refuse_quantization(engine_args.quantization)  # before vLLM checks the method for this platform
    vllm_config = original(engine_args, *args, **kwargs)
    spec_for(vllm_config.model_config.architectures)  # unsupported architecture -> clear error now
    _refuse_quantization(vllm_config.model_config.quantization)  # e.g. from the checkpoint's config
    cfg.check_num_layers(vllm_config.model_config.hf_text_config.num_hidden_layers)
    if graphs:
        _graph_safe_compilation(vllm_config)
    elif getattr(vllm_config, "use_v2_model_runner", False):
        raise ValueError("GRIFFIN runs Model Runner V2 only with CUDA graphs on: set "
                         "additional_config griffin.cuda_graphs=true, or VLLM_USE_V2_MODEL_RUNNER=0.")
    if vllm_config.lora_config is not None:
        raise ValueError("GRIFFIN does not support LoRA adapters yet; start without --enable-lora "
                         "or without the griffin additional_config.")
    parallel = vllm_config.parallel_config
    if parallel.worker_cls != f"{GriffinWorker.__module__}.{GriffinWorker.__qualname__}":
        vllm_config.additional_config[BASE_WORKER_KEY] = parallel.worker_cls
        parallel.worker_cls = f"{GriffinWorker.__module__}.{GriffinWorker.__qualname__}"
    scheduler = vllm_config.scheduler_config
    if scheduler.scheduler_cls != _GRIFFIN_SCHEDULER:
        base = scheduler.scheduler_cls
        if isinstance(base, type):  # a class object: its import path travels to the engine core
            base = f"{base.__module__}.{base.__qualname__}"
        vllm_config.additional_config[BASE_SCHEDULER_KEY] = base
        scheduler.scheduler_cls = _GRIFFIN_SCHEDULER
    _install_request_validation()
    from vllm_griffin.engine.metrics import install_frontend_hooks

    install_frontend_hooks(vllm_config)  # API server: vllm:griffin_* on /metrics
    logger.info("GRIFFIN on: density=%s method=%s%s", cfg.density, cfg.method,
                " (per-layer densities)" if cfg.densities else "")
    return vllm_config


def _refuse_quantization(method: str | None) -> None:
    # The experts' gathers read plain weight rows; quantized layouts have none.
    if method is not None:
        raise ValueError(
            f"GRIFFIN needs unquantized MLP weights; quantization={method!r} is not supported. "
            "Serve an unquantized (bf16/fp16/fp32) checkpoint, or drop the griffin additional_config.")


def _prefer_v1_runner() -> None:
    # The per-step hooks target vLLM's V1 model runner; Model Runner V2 (CUDA's
    # default with Triton) needs its own hooks. Ask for V1 unless the user chose.
    if "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("GRIFFIN: using vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")


def _use_cuda_graphs(cfg: GriffinConfig) -> bool:
    from vllm.platforms import current_platform

    if cfg.cuda_graphs and current_platform.is_cpu():
        logger.info("GRIFFIN: cuda_graphs has no effect on CPU (torch.compile still applies)")
    return cfg.cuda_graphs and not current_platform.is_cpu()


def _prefer_v2_runner(engine_args) -> None:
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "0":
        raise ValueError("GRIFFIN cuda_graphs=true needs Model Runner V2, but VLLM_USE_V2_MODEL_RUNNER=0; "
                         "unset it, or set cuda_graphs=false.")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    if engine_args.enable_prefix_caching is not False:
        # The per-block statistic rows are wired to the V1 runner's block ids only.
        logger.warning("GRIFFIN cuda_graphs: prefix caching off (per-block expert statistics are not "
                       "wired to Model Runner V2 yet)")
        engine_args.enable_prefix_caching = False


def _graph_safe_compilation(vllm_config) -> None:
    """Piecewise graphs leave GRIFFIN's layer out (its host-side plan differs per step);
    FULL graphs are for decode batches only, where the layer reads persistent buffers."""
    from vllm.config.compilation import CUDAGraphMode

    compilation = vllm_config.compilation_config
    if compilation.splitting_ops is not None and "vllm::griffin_mlp" not in compilation.splitting_ops:
        compilation.splitting_ops.append("vllm::griffin_mlp")
    if compilation.cudagraph_mode == CUDAGraphMode.FULL:
        # FULL would also capture mixed batches, whose prompt tokens need the host path.
        compilation.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
        logger.info("GRIFFIN cuda_graphs: cudagraph_mode FULL -> FULL_AND_PIECEWISE (full graphs for decode only)")


def _no_cuda_graphs_yet(engine_args) -> None:
    # A captured CUDA graph would replay one step's expert plan for every later
    # step; the graph-safe path runs on Model Runner V2 (griffin.cuda_graphs=true).
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() and not engine_args.enforce_eager:
        logger.warning("GRIFFIN: CUDA graphs and torch.compile switched off (enforce_eager=True); "
                       "griffin.cuda_graphs=true runs them on Model Runner V2.")
        engine_args.enforce_eager = True


# -- front end: reject bad per-request values before they reach the engine -------------

def _install_request_validation() -> None:
    try:
        from vllm.v1.engine.input_processor import InputProcessor
    except ImportError as exc:  # pragma: no cover - depends on vLLM layout
        raise compat_error("vllm.v1.engine.input_processor.InputProcessor") from exc
    original = getattr(InputProcessor, "_validate_params", None)
    if original is None:
        raise compat_error("InputProcessor._validate_params")
    if getattr(original, "_griffin_wrapped", False):
        return

    @functools.wraps(original)
    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        cfg = GriffinConfig.from_additional_config(self.vllm_config.additional_config)
        if cfg is not None:
            from vllm_griffin.engine.metrics import observe_request
            from vllm_griffin.engine.serving import validate_sampling_params

            observe_request(cfg, validate_sampling_params(params))
        return result

    _validate_params._griffin_wrapped = True
    InputProcessor._validate_params = _validate_params


# -- scheduler side: which KV blocks prefix caching may share ----------------------------

class GriffinScheduler:
    """Stands in for ``scheduler_config.scheduler_cls`` in the engine core process.

    Builds vLLM's own scheduler (sync or async, or the user's) and makes its KV cache
    manager register only blocks made entirely of prompt tokens for sharing: a
    generated token's KV comes from its request's experts (sparse MLP), so a block
    holding one differs from what a full prefill of the same tokens would write.
    """

    def __new__(cls, *args, **kwargs):
        vllm_config = kwargs.get("vllm_config") or args[0]
        config = vllm_config.scheduler_config
        config.scheduler_cls = vllm_config.additional_config.get(BASE_SCHEDULER_KEY)
        try:
            base = config.get_scheduler_cls()
        finally:
            config.scheduler_cls = _GRIFFIN_SCHEDULER
        scheduler = base(*args, **kwargs)
        _share_prompt_blocks_only(scheduler)
        return scheduler


_GRIFFIN_SCHEDULER = f"{GriffinScheduler.__module__}.{GriffinScheduler.__qualname__}"


def block_stats_supported(kv_cache_groups) -> bool:
    """Per-block statistic rows need one full-attention KV cache group (every layer
    keeps every block: a block id names the same prompt tokens in all layers)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return len(kv_cache_groups) == 1 and isinstance(kv_cache_groups[0].kv_cache_spec, FullAttentionSpec)


def _share_prompt_blocks_only(scheduler) -> None:
    coordinator = getattr(getattr(scheduler, "kv_cache_manager", None), "coordinator", None)
    if not callable(getattr(coordinator, "cache_blocks", None)):
        raise compat_error("Scheduler.kv_cache_manager.coordinator.cache_blocks")
    original = coordinator.cache_blocks
    if not block_stats_supported(scheduler.kv_cache_config.kv_cache_groups):
        if scheduler.cache_config.enable_prefix_caching:
            logger.warning("GRIFFIN: prefix caching shares no blocks for this model (hybrid or sliding-window "
                           "KV cache): per-block expert statistics need one full-attention KV cache group.")
        coordinator.cache_blocks = lambda request, num_computed_tokens: None
        return

    def cache_blocks(request, num_computed_tokens):
        original(request, min(num_computed_tokens, request.num_prompt_tokens))

    coordinator.cache_blocks = cache_blocks


# -- worker side -------------------------------------------------------------------------

class GriffinWorker:
    """Stands in for the platform's worker class in ``parallel_config.worker_cls``.

    Constructing it (in the worker process) registers GRIFFIN's model class
    for the served architecture and builds the real worker (CPU, CUDA, ...) as
    a subclass that gives its model runner GRIFFIN's hooks.
    """

    def __new__(cls, *args, **kwargs):
        from vllm.model_executor.models import ModelRegistry
        from vllm.utils.import_utils import resolve_obj_by_qualname

        vllm_config = kwargs.get("vllm_config") or args[0]
        base_name = vllm_config.additional_config.get(BASE_WORKER_KEY)
        if not base_name:
            raise compat_error(f"additional_config[{BASE_WORKER_KEY!r}]")
        arch, spec = spec_for(vllm_config.model_config.architectures)
        model_cls, _ = ModelRegistry.resolve_model_cls([arch], model_config=vllm_config.model_config)
        ModelRegistry.register_model(arch, griffin_model_class(model_cls, spec))
        base = resolve_obj_by_qualname(base_name)
        # Worker extensions vLLM injected into this stand-in's bases travel along.
        extensions = tuple(b for b in cls.__bases__ if b is not object)
        worker_cls = _subclass(base, _GriffinWorkerMixin, extensions)
        return worker_cls(*args, **kwargs)


class _GriffinWorkerMixin:
    def init_device(self, *args, **kwargs):
        result = super().init_device(*args, **kwargs)
        runner = getattr(self, "model_runner", None)
        if runner is None:
            raise compat_error("Worker.model_runner after init_device")
        v2 = type(runner).__module__.startswith("vllm.v1.worker.gpu.")
        required = _REQUIRED_RUNNER_V2_ATTRS if v2 else _REQUIRED_RUNNER_ATTRS
        missing = [a for a in required if not hasattr(runner, a)]
        if missing:
            raise compat_error(f"{type(runner).__name__}.{missing[0]}")
        if v2:
            from vllm_griffin.engine.runner_v2 import GriffinRunnerV2Mixin

            runner.__class__ = _subclass(type(runner), GriffinRunnerV2Mixin)
        else:
            runner.__class__ = _subclass(type(runner), GriffinRunnerMixin)
        return result

    def determine_available_memory(self, *args, **kwargs):
        """vLLM's KV cache budget, whole: the per-block expert statistic that exact prefix
        caching needs lives in host memory beside it (GriffinState.enable_block_stats)."""
        available = super().determine_available_memory(*args, **kwargs)
        runner = self.model_runner
        state = getattr(runner, "griffin", None)
        if state is not None and runner.cache_config.enable_prefix_caching:
            specs = list(runner.get_kv_cache_spec().values())
            kv_bytes = sum(s.page_size_bytes for s in specs)  # one block, every layer
            if kv_bytes:
                logger.info("GRIFFIN: prefix caching adds %d bytes of host memory per %d-byte KV block "
                            "(%.1f %% of the KV cache's size; the KV cache itself keeps its budget)",
                            state.block_stats_bytes(), kv_bytes, 100 * state.block_stats_bytes() / kv_bytes)
        return available

    def griffin_export_to(self, directory: str | None) -> None:
        """Start (a folder) or stop (None) writing each request's experts, at run time."""
        self.model_runner.griffin.export_dir = directory

    def griffin_stats(self) -> dict:
        """Live GRIFFIN state of this worker (``LLM.collective_rpc("griffin_stats")``)."""
        state = self.model_runner.griffin
        try:
            state.check_invariants()
            problems = ""
        except RuntimeError as exc:
            problems = str(exc)
        return {
            **state.counters(),
            "inconsistencies": problems,  # "" when the pools, tables and requests agree
            "requests": sorted(state.requests),
            "decode_paths": dict(state.path_counts),
            "mean_union_fraction": state.union_fraction_sum / max(1, state.union_samples),
            "union_fraction_sum": state.union_fraction_sum,
            "union_samples": state.union_samples,
            "capture_seconds": state.capture_seconds,
            "select_seconds": state.select_seconds,
            "restarts": state.restarts,
            "multi_token_decode_rows": state.multi_token_decode_rows,
            "refresh_tokens": state.refresh_tokens,
            "loop_guard_tokens": state.loop_guard_tokens,
            "prefix_hits": state.prefix_hits,
            "prefix_hit_tokens": state.prefix_hit_tokens,
        }


@functools.cache
def _subclass(base: type, mixin: type, extensions: tuple[type, ...] = ()) -> type:
    return type(f"Griffin{base.__name__}", (mixin, base, *extensions), {})


@functools.cache
def griffin_model_class(base: type, spec) -> type:
    """``base`` (e.g. vLLM's LlamaForCausalLM) whose MLPs become GriffinMLPs at construction."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        cfg = GriffinConfig.from_additional_config(vllm_config.additional_config)
        self.griffin_state = None if cfg is None else _install_on_model(self, spec, cfg, vllm_config)

    def get_model_state_cls(self):
        # Model Runner V2 asks the model for its per-step state: vLLM's default plus GRIFFIN's hooks.
        from vllm_griffin.engine.runner_v2 import default_model_state_cls, griffin_model_state_cls

        if self.griffin_state is None:
            return default_model_state_cls()
        return griffin_model_state_cls(default_model_state_cls())

    return type(base.__name__, (base,), {"__init__": __init__, "get_model_state_cls": get_model_state_cls,
                                         "__module__": __name__,
                                         "__qualname__": f"griffin_model_class.<{base.__name__}>"})


class GriffinRunnerMixin:
    """Hooks on vLLM's V1 model runner (one instance, not the class)."""

    griffin = None  # GriffinState once the model is loaded

    def load_model(self, *args, **kwargs):
        result = super().load_model(*args, **kwargs)
        self.griffin = getattr(self.get_model(), "griffin_state", None)
        if self.griffin is None:
            raise compat_error("GRIFFIN's model class in the model registry")
        # With asynchronous scheduling the host copy of a step's input tokens holds placeholders.
        self.griffin.token_ids_visible = not getattr(self, "use_async_scheduling", False)
        return result

    def _model_forward(self, *args, **kwargs):
        if self.griffin is None:
            return super()._model_forward(*args, **kwargs)
        from vllm_griffin.engine.layers import active_plan

        plan = self.griffin.plan_step(_step_rows(self))
        with active_plan(plan):
            output = super()._model_forward(*args, **kwargs)
        self.griffin.finish_step(plan)
        return output

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
        result = super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        groups = kv_cache_config.kv_cache_groups
        if (self.griffin is not None and self.cache_config.enable_prefix_caching
                and block_stats_supported(groups)):
            self.griffin.enable_block_stats(kv_cache_config.num_blocks, groups[0].kv_cache_spec.block_size)
        return result

    def _on_request_state_removed(self, req_id, req_state):
        super()._on_request_state_removed(req_id, req_state)
        if self.griffin is not None:
            self.griffin.release(req_id)


def _tensor_parallel(cfg):
    """This worker's TP rank and collectives for GRIFFIN, or None on a single device."""
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
        tensor_model_parallel_all_gather,
        tensor_model_parallel_all_reduce,
    )

    from vllm_griffin.core.state import TensorParallel

    size = get_tensor_model_parallel_world_size()
    if size == 1:
        return None
    return TensorParallel(rank=get_tensor_model_parallel_rank(), size=size,
                          all_reduce=tensor_model_parallel_all_reduce,
                          all_gather=lambda t: tensor_model_parallel_all_gather(t, dim=-1),
                          selection=cfg.tp_selection)


def _install_on_model(model, spec, cfg, vllm_config):
    from vllm.distributed import get_tensor_model_parallel_rank

    from vllm_griffin.core.export import export_dir_from_env
    from vllm_griffin.core.state import GriffinState
    from vllm_griffin.engine.layers import install

    def make_state(num_layers, width, device):
        return GriffinState(
            cfg, num_layers, width, device,
            max_seqs=vllm_config.scheduler_config.max_num_seqs,
            export_dir=export_dir_from_env(),
            export_enabled=get_tensor_model_parallel_rank() == 0,
            tp=_tensor_parallel(cfg),
        )

    state = install(model, spec, make_state)
    logger.info("GRIFFIN: %d layers, %d neurons each, expert table %.1f MiB",
                state.num_layers, state.width, state.experts.numel() * 4 / 2**20)
    return state


def _step_rows(runner):
    from vllm_griffin.core.state import StepRow

    batch = runner.input_batch
    num_reqs = batch.num_reqs
    starts = runner.query_start_loc.np[: num_reqs + 1]
    block_stats = runner.griffin.block_stats is not None
    token_ids = batch.token_ids_cpu if runner.griffin.token_ids_visible else None
    rows = []
    for i, req_id in enumerate(batch.req_ids[:num_reqs]):
        req = runner.requests[req_id]
        params = req.sampling_params
        prompt_len, computed = int(batch.num_prompt_tokens[i]), int(batch.num_computed_tokens_cpu[i])
        rows.append(StepRow(
            req_id=req_id,
            prompt_len=prompt_len,
            num_computed=computed,
            num_scheduled=int(starts[i + 1] - starts[i]),
            extra_args=getattr(params, "extra_args", None),
            seed=getattr(params, "seed", None),
            # Only prompt rows read or fill per-block statistic rows.
            block_ids=req.block_ids[0] if block_stats and computed < prompt_len else None,
            # Up to the last verified token: speculative drafts are not the output yet.
            token_ids=None if token_ids is None else token_ids[i, : int(batch.num_tokens_no_spec[i])],
        ))
    return rows
