"""Write a request's experts to ``$VLLM_GRIFFIN_EXPORT_DIR/<request_id>.safetensors``.

One int32 tensor per layer (``layer.<i>``, sorted neuron indices), the statistic the
selection ranked where there is one (``statistic``: [layers, D] fp32, the sums
``sum_t z_tj^2 / ||z_t||^2`` over the prompt; absent for static methods and under
tensor parallelism) and string metadata: prompt_len, density, method, request_id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

EXPORT_DIR_ENV = "VLLM_GRIFFIN_EXPORT_DIR"
# vLLM appends "-" and 8 random hex characters to the caller's request id.
_INTERNAL_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def export_dir_from_env() -> str | None:
    return os.environ.get(EXPORT_DIR_ENV) or None


def external_request_id(internal_id: str) -> str:
    """The id ``RequestOutput.request_id`` shows for vLLM's internal request id."""
    if os.environ.get("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "0") not in ("", "0"):
        return internal_id
    return _INTERNAL_SUFFIX.sub("", internal_id)


def write_experts(directory: str | os.PathLike, state: Any, experts: list[torch.Tensor],
                  statistic: torch.Tensor | None = None) -> Path:
    """``state``: the request (``core.state.RequestState``: its req_id, prompt_len, density, method)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    request_id = external_request_id(state.req_id)
    safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", request_id)
    path = directory / f"{safe_name}.safetensors"
    tensors = {f"layer.{i}": e.to(torch.int32).contiguous() for i, e in enumerate(experts)}
    if statistic is not None:
        tensors["statistic"] = statistic.float().contiguous()
    metadata = {
        "request_id": request_id,
        "prompt_len": str(state.prompt_len),
        "density": repr(state.density),
        "method": state.method,
    }
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # readers never see a half-written file
    return path


def read_experts(path: str | os.PathLike) -> tuple[list[torch.Tensor], dict[str, str]]:
    """(experts per layer, metadata) of an exported file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = load_file(str(path))
    layers = [tensors[f"layer.{i}"] for i in range(sum(1 for name in tensors if name.startswith("layer.")))]
    return layers, metadata


def read_statistic(path: str | os.PathLike) -> torch.Tensor | None:
    """The [layers, D] statistic an exported file holds, or None."""
    return load_file(str(path)).get("statistic")
