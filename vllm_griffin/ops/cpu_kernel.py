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
    args = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    for order in ("rows", "union"):
        for suffix in _WEIGHT_SUFFIX.values():
            fn = getattr(lib, f"griffin_experts_{order}_{suffix}")
            fn.argtypes, fn.restype = args, None
    _lib = lib
    return _lib


def supports(w_gate_up: torch.Tensor, w_down_t: torch.Tensor, activation: str | None) -> bool:
    return (activation in ACT_CODES and w_gate_up.device.type == "cpu"
            and w_gate_up.dtype in _WEIGHT_SUFFIX and w_down_t.dtype == w_gate_up.dtype
            and w_gate_up.is_contiguous() and w_down_t.is_contiguous() and load() is not None)


def experts_mlp_cpu(x, w_gate_up, w_down_t, experts, counts, activation: str, order: str) -> torch.Tensor:
    """``order`` is "rows" (weights streamed per row) or "union" (once per step); same numbers."""
    lib = load()
    rows, hidden = x.shape
    width = w_down_t.shape[0]
    x32 = x.to(torch.float32).contiguous()
    experts = experts.to(torch.int64).contiguous()
    counts = counts.to(torch.int64).contiguous()
    out = torch.empty(rows, hidden, dtype=torch.float32)
    fn = getattr(lib, f"griffin_experts_{order}_{_WEIGHT_SUFFIX[w_gate_up.dtype]}")
    fn(x32.data_ptr(), w_gate_up.data_ptr(), w_down_t.data_ptr(), experts.data_ptr(), counts.data_ptr(),
       out.data_ptr(), rows, hidden, width, experts.shape[1], ACT_CODES[activation])
    return out.to(x.dtype)
