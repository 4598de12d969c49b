"""Build and call the C decode kernel (cpu_experts.c) on the CPU.

Compiled once per machine with the system C compiler (``-O3 -march=native``)
into ``$VLLM_GRIFFIN_HOME/kernels/<source hash>/``, loaded with ctypes: no
torch extension toolchain, a one-second build. If no compiler is available the
callers fall back to the plain-torch paths (one warning).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from vllm_griffin.ops.reference import ExpertWeights

logger = logging.getLogger("vllm.griffin.cpu_kernel")

SOURCE = Path(__file__).with_name("cpu_experts.c")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c11"]
ACT_CODES = {"silu": 0, "gelu_tanh": 1, "relu": 2, "gelu": 3}
_WEIGHT_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_lib: ctypes.CDLL | None = None
_failed = False


def _cache_root() -> Path:
    home = os.environ.get("VLLM_GRIFFIN_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "vllm-griffin")
    return Path(home) / "kernels"


def build() -> Path:
    """Compile the kernel if this source and these flags have not been built here yet."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    out_dir = _cache_root() / digest
    lib_path = out_dir / "libgriffin_cpu.so"
    if lib_path.exists():
        return lib_path
    out_dir.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc/cc) found")
    with open(out_dir / ".lock", "w") as lock:  # tensor-parallel ranks build once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not lib_path.exists():
            with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                tmp_lib = Path(tmp) / lib_path.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp_lib), "-lm"],
                               check=True, capture_output=True, text=True)
                os.replace(tmp_lib, lib_path)
    return lib_path


def load() -> ctypes.CDLL | None:
    """The compiled library, or None (once warned) when it cannot be built."""
    global _lib, _failed
    if _lib is not None or _failed:
        return _lib
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("GRIFFIN: CPU decode kernel unavailable (%s); using the plain-torch path", detail)
        _failed = True
        return None
    args = [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    for order in ("rows", "union"):
        for suffix in _WEIGHT_SUFFIX.values():
            fn = getattr(lib, f"griffin_experts_{order}_{suffix}")
            fn.argtypes, fn.restype = args, None
    _lib = lib
    return _lib


def supports(weights: ExpertWeights | None, activation: str | None) -> bool:
    return (weights is not None and activation in ACT_CODES and weights.gate.device.type == "cpu"
            and weights.gate.dtype in _WEIGHT_SUFFIX and load() is not None)


def experts_mlp_cpu(x, weights: ExpertWeights, experts, counts, activation: str, order: str) -> torch.Tensor:
    """``order`` is "rows" (weights streamed per row) or "union" (once per step); same numbers."""
    lib = load()
    rows, hidden = x.shape
    x32 = x.to(torch.float32).contiguous()
    experts = experts.to(torch.int64).contiguous()
    counts = counts.to(torch.int64).contiguous()
    out = torch.empty(rows, hidden, dtype=torch.float32)
    fn = getattr(lib, f"griffin_experts_{order}_{_WEIGHT_SUFFIX[weights.gate.dtype]}")
    fn(x32.data_ptr(), weights.gate.data_ptr(), weights.up.data_ptr(), weights.down_t.data_ptr(),
       weights.gate.stride(0), experts.data_ptr(), counts.data_ptr(), out.data_ptr(),
       rows, hidden, weights.width, experts.shape[1], ACT_CODES[activation])
    return out.to(x.dtype)
