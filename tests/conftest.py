"""Shared fixtures. vLLM engines are expensive (20-60 s to start on this CPU) and
two at once overload the machine, so :class:`Engines` keeps at most one alive
and hands the same one to every test that asks for the same settings."""

from __future__ import annotations

import gc
import os
import subprocess
from pathlib import Path

import pytest
import torch

from vllm_griffin.tools.models import file_lock

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One vLLM engine (or server) at a time on this machine, across processes too:
# every engine a test starts holds this lock (shell scripts: `flock $ENGINE_LOCK ...`).
ENGINE_LOCK = os.environ.get("VLLM_GRIFFIN_ENGINE_LOCK", "/tmp/vllm-griffin-engine.lock")


def engine_lock():
    return file_lock(ENGINE_LOCK)


def run_engine_command(engines, cmd, timeout=900, env=None, **kwargs):
    """Run a command that starts its own vLLM engine (a CLI, a server, `make demo`): this
    process's engine is closed first (it holds the engine lock; waiting on the lock with it
    open would never end), then the command runs holding the lock. Output is captured."""
    engines.close()
    with engine_lock():
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}, **kwargs)


# Settings every test engine shares: CPU-sized and float32, so GRIFFIN can be
# compared token for token with the float32 oracle.
BASE_ENGINE = dict(
    dtype="float32",
    enforce_eager=True,
    gpu_memory_utilization=0.5,
    seed=0,
)


class Engines:
    def __init__(self):
        self.key = None
        self.llm = None
        self._lock = None

    def get(self, key: str, *, env: dict[str, str] | None = None, **kwargs):
        if key == self.key:
            return self.llm
        self.close()
        from vllm import LLM
        from vllm.plugins import load_general_plugins

        # This process loads its plugins once, for good: do it before any test's
        # VLLM_PLUGINS="" (meant for that engine's own processes) could stop it.
        load_general_plugins()
        saved = {name: os.environ.get(name) for name in (env or {})}
        os.environ.update(env or {})
        self._lock = engine_lock()
        self._lock.__enter__()
        try:
            self.llm = LLM(**{**BASE_ENGINE, **kwargs})
        except BaseException:
            self._release()
            raise
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        self.key = key
        return self.llm

    def close(self):
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            finally:
                self.llm = None
                self.key = None
                gc.collect()
                self._release()

    def _release(self):
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None


@pytest.fixture(params=["kernel", "torch"])
def capture_path(request, monkeypatch):
    """The prompt statistic's capture through the C kernel, or through the plain-torch
    path GPUs take (parametrizes the state tests that use it)."""
    if request.param == "torch":
        monkeypatch.setattr("vllm_griffin.core.state.capture_ops.uses_kernel", lambda z: False)
    else:
        from vllm_griffin.ops import capture

        assert capture.uses_kernel(torch.zeros(1, 1))
    return request.param


@pytest.fixture(scope="session")
def engines():
    manager = Engines()
    yield manager
    manager.close()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 3-layer random Llama saved by transformers (float32, no tokenizer).

    initializer_range=0.2 makes its next-token distributions peaked, so greedy
    tokens are decided by real margins rather than float noise."""
    import transformers

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=512, max_position_embeddings=1024,
        initializer_range=0.2, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    transformers.LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from vllm_griffin.tools.models import prepare_model

    return prepare_model("smollm2-135m-instruct")


def hf_model(path: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return model.eval()
