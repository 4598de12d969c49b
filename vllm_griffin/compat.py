"""Which vLLM hook points GRIFFIN uses, and a check that they are all there.

GRIFFIN hooks vLLM by name (no source patch): a method it wraps, a class it
subclasses, a function it calls. When vLLM moves one of them, the check names
the vLLM version and the missing hook before an engine starts, instead of an
AttributeError deep in a worker process.

``register()`` runs the cheap part at plugin load (the one hook every engine
passes through) and warns; a GRIFFIN engine runs the whole table when its
config is created and fails with :class:`~vllm_griffin.integration.GriffinCompatError`.
Attributes a model runner only gets in ``__init__`` (``input_batch``,
``requests``, ...) are checked on the live runner when the worker starts.
"""

from __future__ import annotations

import importlib

# (module, attribute path) pairs; each row names one thing GRIFFIN relies on.
PLUGIN_LOAD_HOOKS: tuple[tuple[str, str], ...] = (
    ("vllm.engine.arg_utils", "EngineArgs.create_engine_config"),  # wrapped by register()
    # `vllm serve --plugin griffin`: the parser group and its folding into additional_config
    ("vllm.engine.arg_utils", "EngineArgs.add_cli_args"),
    ("vllm.engine.arg_utils", "EngineArgs.from_cli_args"),
)

ENGINE_HOOKS: tuple[tuple[str, str], ...] = PLUGIN_LOAD_HOOKS + (
    # front end: per-request extra_args validation
    ("vllm.v1.engine.input_processor", "InputProcessor._validate_params"),
    # worker: GRIFFIN's model class and the runner hooks
    ("vllm.model_executor.models", "ModelRegistry.register_model"),
    ("vllm.model_executor.models", "ModelRegistry.resolve_model_cls"),
    ("vllm.utils.import_utils", "resolve_obj_by_qualname"),
    ("vllm.utils.torch_utils", "direct_register_custom_op"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.load_model"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._model_forward"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._on_request_state_removed"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.get_model"),
    # prefix caching: the scheduler stand-in, and per-block statistic rows beside the KV cache
    ("vllm.config", "SchedulerConfig.get_scheduler_cls"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.initialize_kv_cache"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.get_kv_cache_spec"),
    ("vllm.v1.worker.gpu_worker", "Worker.determine_available_memory"),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec.page_size_bytes"),
    # tensor parallelism: the statistic's norm and the global top-k
    ("vllm.distributed", "get_tensor_model_parallel_rank"),
    ("vllm.distributed", "get_tensor_model_parallel_world_size"),
    ("vllm.distributed", "tensor_model_parallel_all_reduce"),
    ("vllm.distributed", "tensor_model_parallel_all_gather"),
)

# griffin.cuda_graphs=true (CUDA): Model Runner V2's model state, its batch, and the graph dispatch.
GRAPH_HOOKS: tuple[tuple[str, str], ...] = (
    ("vllm.v1.worker.gpu.model_states", "resolve_model_state_cls"),
    ("vllm.v1.worker.gpu.model_states.default", "DefaultModelState.add_request"),
    ("vllm.v1.worker.gpu.model_states.default", "DefaultModelState.prepare_inputs"),
    ("vllm.v1.worker.gpu.model_states.default", "DefaultModelState.postprocess_state"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.finish_requests"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.gather_batch_req_state"),
    ("vllm.v1.worker.gpu.model_runner", "BatchReqState._replace"),
    ("vllm.v1.worker.gpu.input_batch", "InputBatch.make_dummy"),
    ("vllm.forward_context", "is_forward_context_available"),
    ("vllm.config.compilation", "CUDAGraphMode.FULL_AND_PIECEWISE"),
)


def missing_hooks(hooks: tuple[tuple[str, str], ...] = ENGINE_HOOKS) -> list[str]:
    """``module:attribute`` of every hook that is not there (empty when all are)."""
    missing = []
    for module_name, path in hooks:
        try:
            obj = importlib.import_module(module_name)
        except ImportError:
            missing.append(f"{module_name} (module)")
            continue
        for name in path.split("."):
            if not hasattr(obj, name):
                missing.append(f"{module_name}:{path}")
                break
            obj = getattr(obj, name)
    return missing
