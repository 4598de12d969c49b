"""Plugin registration and start-up validation (no engine gets as far as starting)."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.conftest import run_engine_command

ROOT = Path(__file__).resolve().parents[1]


def test_entry_point_is_registered():
    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "griffin"]
    assert ep.value == "vllm_griffin:register"


def test_register_is_idempotent_and_wraps_one_thing():
    from vllm.engine.arg_utils import EngineArgs

    import vllm_griffin

    vllm_griffin.register()
    first = EngineArgs.create_engine_config
    vllm_griffin.register()
    assert EngineArgs.create_engine_config is first
    assert getattr(first, "_griffin_wrapped", False)


def start(model, **kwargs):
    from vllm import LLM

    return LLM(model=str(model), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
               gpu_memory_utilization=0.5, max_model_len=256, **kwargs)


@pytest.mark.parametrize("griffin, message", [
    ({"density": 2}, r"additional_config\[\"griffin\"\]: density=2 is invalid; allowed: a number with 0 < density <= 1"),
    ({"density": 0.5, "method": "best"}, "method='best' is invalid; allowed: topk, magnitude, random, sample, topk_sample"),
    ({"dens": 0.5}, "dens=0.5 is invalid; allowed: keys density, method, densities, seed"),
    ({"densities": [0.5, 0.5]}, "densities=.* needs exactly 3 entries"),
])
def test_bad_engine_config_fails_at_startup_with_a_clear_error(engines, tiny_llama_dir, griffin, message):
    engines.close()
    with pytest.raises(ValueError, match=message):
        start(tiny_llama_dir, additional_config={"griffin": griffin})


def test_unsupported_architecture_lists_the_supported_ones(engines, tmp_path):
    import transformers

    engines.close()
    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=128, n_positions=256)
    cfg.architectures = ["GPT2LMHeadModel"]
    cfg.save_pretrained(tmp_path)
    from vllm_griffin.core.architectures import ARCHITECTURES

    supported = ", ".join(sorted(ARCHITECTURES))
    with pytest.raises(ValueError, match=r"does not support architecture \['GPT2LMHeadModel'\]; supported: ") as info:
        start(tmp_path, additional_config={"griffin": {"density": 0.5, "method": "topk"}})
    assert str(info.value).endswith(supported) and "OPTForCausalLM" in supported


@pytest.mark.slow
def test_make_demo_runs_to_the_end(engines):
    proc = run_engine_command(engines, ["make", "demo"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "demo finished" in proc.stdout
    # Each question answered dense and by the default method at 0.75 and 0.5, with speeds.
    for label in ("--- dense", "--- GRIFFIN (default: gated, refresh 4) at density 0.75",
                  "--- GRIFFIN (default: gated, refresh 4) at density 0.5"):
        assert proc.stdout.count(label) == 4, label
    assert proc.stdout.count("tok/s (batch of 4") == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"quantization": "fp8"}, r"GRIFFIN needs unquantized MLP weights; quantization='fp8' is not supported"),
    ({"enable_lora": True}, r"GRIFFIN does not support LoRA adapters yet; start without --enable-lora"),
])
def test_quantization_and_lora_are_refused_at_startup(engines, tiny_llama_dir, kwargs, message):
    engines.close()
    with pytest.raises(ValueError, match=message):
        start(tiny_llama_dir, additional_config={"griffin": {"density": 0.5, "method": "topk"}}, **kwargs)
