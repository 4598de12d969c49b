"""The compatibility check: every vLLM hook GRIFFIN uses is present in the
installed vLLM, and a missing one is named (with the vLLM version) before any
engine starts. No engine is started here."""

from __future__ import annotations

import pytest


def test_installed_vllm_has_every_hook():
    from vllm_griffin.compat import ENGINE_HOOKS, missing_hooks

    assert missing_hooks() == []
    assert len(ENGINE_HOOKS) > 10


def test_installed_vllm_has_every_model_runner_v2_hook():
    # griffin.cuda_graphs=true runs on Model Runner V2 (CUDA only), checked on GPUs at config time.
    from vllm_griffin.compat import GRAPH_HOOKS, missing_hooks

    assert missing_hooks(GRAPH_HOOKS) == []


def test_missing_runner_hook_fails_griffin_engine_config_naming_version_and_hook(monkeypatch, tiny_llama_dir):
    import vllm
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import vllm_griffin
    from vllm_griffin.integration import GriffinCompatError

    vllm_griffin.register()
    monkeypatch.delattr(GPUModelRunner, "_on_request_state_removed")
    args = EngineArgs(model=str(tiny_llama_dir), skip_tokenizer_init=True, dtype="float32",
                      additional_config={"griffin": {"density": 0.5, "method": "topk"}})
    with pytest.raises(GriffinCompatError) as info:
        args.create_engine_config()
    message = str(info.value)
    assert f"vLLM {vllm.__version__}" in message
    assert "vllm.v1.worker.gpu_model_runner:GPUModelRunner._on_request_state_removed is missing" in message
    assert "tested with vLLM 0.32.0" in message


def test_missing_module_is_named(monkeypatch):
    from vllm_griffin import compat

    hooks = (("vllm.v1.engine.input_processor", "InputProcessor._validate_params"),
             ("vllm.no_such_module", "Thing.method"))
    assert compat.missing_hooks(hooks) == ["vllm.no_such_module (module)"]
    monkeypatch.delattr("vllm.v1.engine.input_processor.InputProcessor._validate_params")
    assert compat.missing_hooks(hooks) == ["vllm.v1.engine.input_processor:InputProcessor._validate_params",
                                           "vllm.no_such_module (module)"]


def test_plugin_load_warns_and_leaves_plain_vllm_alone_when_its_hook_moved(monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_griffin import integration

    warnings = []
    monkeypatch.setattr(integration.logger, "warning", lambda fmt, *a: warnings.append(fmt % a))
    monkeypatch.delattr(EngineArgs, "create_engine_config")
    integration.register()  # no exception: vLLM without GRIFFIN keeps working
    assert not hasattr(EngineArgs, "create_engine_config")
    (message,) = warnings
    assert "vllm.engine.arg_utils:EngineArgs.create_engine_config is missing" in message
    assert "cannot hook vLLM" in message
