"""Build and call the C kernels (cpu_experts.c) on the CPU: decode experts and prefill capture.

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
# The activations the fused masked path (griffin_act_keep_*) computes itself.
FUSED_ACT_CODES = {"silu": 0, "gelu_tanh": 1}
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
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    for suffix in _WEIGHT_SUFFIX.values():
        fn = getattr(lib, f"griffin_gated_{suffix}")
        fn.argtypes, fn.restype = [ptr] * 4 + [i64] + [ptr] * 4 + [i64] * 4 + [ctypes.c_int] * 2, None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    for suffix in _WEIGHT_SUFFIX.values():
        fn = getattr(lib, f"griffin_capture_{suffix}")
        fn.argtypes, fn.restype = [ptr, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr], None
        fn = getattr(lib, f"griffin_sq_norms_{suffix}")
        fn.argtypes, fn.restype = [ptr, i64, i64, ptr, i64, ptr], None
    for suffix in _WEIGHT_SUFFIX.values():
        fn = getattr(lib, f"griffin_keep_rows_{suffix}")
        fn.argtypes, fn.restype = [ptr, i64, ptr, i64, ptr, i64, i64], None
        fn = getattr(lib, f"griffin_act_keep_{suffix}")
        fn.argtypes, fn.restype = [ptr, i64, ptr, i64, ptr, i64, ptr, i64, i64, ctypes.c_int], None
        fn = getattr(lib, f"griffin_gated_act_keep_{suffix}")
        fn.argtypes, fn.restype = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, i64, ctypes.c_int], None
    lib.griffin_first_bad_index.argtypes = [ptr, i64, i64, ctypes.c_int]
    lib.griffin_first_bad_index.restype = i64
    _lib = lib
    return _lib


def supports(weights: ExpertWeights | None, activation: str | None) -> bool:
    return (weights is not None and activation in ACT_CODES and weights.gate.device.type == "cpu"
            and weights.gate.dtype in _WEIGHT_SUFFIX and load() is not None)


def _expert_call(x, weights: ExpertWeights, experts, counts):
    """What both expert kernels take first: x as float32 rows, the weights' four pointers and
    stride, int64 experts and counts, and the float32 output they write."""
    rows, hidden = x.shape
    x32 = x.to(torch.float32).contiguous()
    experts = experts.to(torch.int64).contiguous()
    counts = counts.to(torch.int64).contiguous()
    out = torch.empty(rows, hidden, dtype=torch.float32)
    args = [x32.data_ptr(), weights.gate.data_ptr(), weights.up.data_ptr(), weights.down_t.data_ptr(),
            weights.gate.stride(0), experts.data_ptr(), counts.data_ptr()]
    # x32, experts and counts must outlive the call: returned with the pointers.
    return args, (x32, experts, counts), out


def experts_mlp_cpu(x, weights: ExpertWeights, experts, counts, activation: str, order: str) -> torch.Tensor:
    """Each row of x [T, H] through its own experts (``experts`` [T, K] ascending per row, the
    first ``counts[t]`` of row t; contract: reference.experts_mlp_gather); [T, H] in x's dtype.

    ``order`` "rows": row by row, each streaming its experts' weights (T = 1, 2); "union":
    over the union U of the step's experts in blocks, each neuron's weights read from memory
    once for all rows, then register-tiled micro-kernels doing only the rows' own products
    (time ~ a + b * U + c * P, P = the rows' expert counts summed: benchmarks/cpu_kernels.py
    --fit). Both orders give every row the same bits, whatever else is in the step."""
    args, alive, out = _expert_call(x, weights, experts, counts)  # `alive` holds what args point to
    experts = alive[1]
    fn = getattr(load(), f"griffin_experts_{order}_{_WEIGHT_SUFFIX[weights.gate.dtype]}")
    fn(*args, out.data_ptr(), x.shape[0], x.shape[1], weights.width, experts.shape[1], ACT_CODES[activation])
    return out.to(x.dtype)


def gated_experts_cpu(x, weights: ExpertWeights, experts, counts, ks, activation: str,
                      order: str = "rows") -> torch.Tensor:
    """The ``gated`` decode MLP (contract: reference.gated_experts_reference). ``experts`` /
    ``counts``: each row's pool (ascending); ``ks[t]``: how many of its pool the row keeps
    (0: all of it, a row of another method). Each row computes its pool's gates, keeps the
    k of largest |act(gate)| and runs up and down on those: (pool + 2k) of 3D weight rows.
    ``order`` as experts_mlp_cpu; the two give the same bits."""
    if order not in ("rows", "union"):
        raise ValueError(f"order {order!r}; allowed: rows, union")
    args, alive, out = _expert_call(x, weights, experts, counts)  # `alive` holds what args point to
    experts = alive[1]
    ks = ks.to(torch.int64).contiguous()
    fn = getattr(load(), f"griffin_gated_{_WEIGHT_SUFFIX[weights.gate.dtype]}")
    fn(*args, ks.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], weights.width, experts.shape[1],
       ACT_CODES[activation], int(order == "union"))
    return out.to(x.dtype)


# --- prefill capture (contract: capture_reference in vllm_griffin/ops/reference.py) ---

def _capture_lib() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError("GRIFFIN: the CPU capture kernel is unavailable (no C compiler?); "
                           "use vllm_griffin.ops.capture, which falls back to torch")
    return lib


def _rows(z: torch.Tensor) -> torch.Tensor:
    """z as [N, D] rows the kernel can walk: unit column stride, any row stride."""
    if z.device.type != "cpu":
        raise ValueError(f"z is on {z.device}; the C kernel needs CPU tensors")
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D [tokens, neurons], got shape {tuple(z.shape)}")
    if z.dtype not in _WEIGHT_SUFFIX:
        raise ValueError(f"z dtype {z.dtype} is not supported by the C kernel; allowed: float32, bfloat16")
    return z if z.stride(1) == 1 or z.shape[1] <= 1 else z.contiguous()


def _index(lib: ctypes.CDLL, name: str, idx: torch.Tensor, length: int, high: int, allow_skip: bool) -> torch.Tensor:
    """int64, contiguous, ``length`` entries, each < ``high`` (and >= 0 unless negatives
    mean skip). Checked because the kernel writes through these indices unchecked."""
    if idx.device.type != "cpu":
        raise ValueError(f"{name} is on {idx.device}; the C kernel needs CPU tensors")
    idx = idx.reshape(-1).to(torch.int64).contiguous()
    if idx.numel() != length:
        raise ValueError(f"{name} has {idx.numel()} entries; expected {length} (one per token)")
    bad = lib.griffin_first_bad_index(idx.data_ptr(), length, high, int(allow_skip))
    if bad >= 0:
        allowed = f"-1 (skip) or 0..{high - 1}" if allow_skip else f"0..{high - 1}"
        raise ValueError(f"{name}[{bad}] = {int(idx[bad])}; allowed: {allowed}")
    return idx


def _target(name: str, t: torch.Tensor, width: int) -> None:
    if (t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() or t.dim() != 2
            or t.shape[1] != width):
        raise ValueError(f"{name} must be a contiguous float32 CPU [rows, {width}] tensor, got {t.dtype} "
                         f"{tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()})")


def capture_cpu(z, pos, sq_norms, acc, acc_idx, blk=None, blk_idx=None, check: bool = True) -> None:
    """acc[acc_idx[m]] += z[pos[m]]**2 / ||z[pos[m]]||**2 (and blk likewise), in place.

    ``pos`` None means every row of z; ``sq_norms`` ([M] or [M, 1]) replaces the
    row norms (a tensor-parallel rank's slice); an index of -1 skips that token.
    ``check=False``: the indices are int64, contiguous, one per token and in range
    (a step plan's, built that way; checked once would otherwise be checked per layer).
    """
    lib = _capture_lib()
    z = _rows(z)
    rows, width = z.shape
    if check and pos is not None:
        pos = _index(lib, "pos", pos, pos.numel(), rows, allow_skip=False)
    tokens = rows if pos is None else pos.numel()
    if sq_norms is not None:
        sq_norms = sq_norms.reshape(-1).to(device="cpu", dtype=torch.float32).contiguous()
        if check and sq_norms.numel() != tokens:
            raise ValueError(f"sq_norms has {sq_norms.numel()} entries; expected {tokens} (one per token)")
    targets = [acc, acc_idx, blk, blk_idx]
    for i, (name, target, idx) in enumerate((("acc", acc, acc_idx), ("blk", blk, blk_idx))):
        if not check or target is None:
            continue
        if idx is None:
            raise ValueError(f"{name} is given but {name}_idx is None")
        _target(name, target, width)
        targets[2 * i + 1] = _index(lib, f"{name}_idx", idx, tokens, target.shape[0], allow_skip=True)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    fn = getattr(lib, f"griffin_capture_{_WEIGHT_SUFFIX[z.dtype]}")
    fn(z.data_ptr(), z.stride(0), width, ptr(pos), tokens, ptr(sq_norms), *(ptr(t) for t in targets))


def sq_norms_cpu(z, pos=None) -> torch.Tensor:
    """[M, 1] float32: ||z[pos[m]]||**2 (every row when ``pos`` is None)."""
    lib = _capture_lib()
    z = _rows(z)
    if pos is not None:
        pos = _index(lib, "pos", pos, pos.numel(), z.shape[0], allow_skip=False)
    tokens = z.shape[0] if pos is None else pos.numel()
    out = torch.empty(tokens, 1, dtype=torch.float32)
    fn = getattr(lib, f"griffin_sq_norms_{_WEIGHT_SUFFIX[z.dtype]}")
    fn(z.data_ptr(), z.stride(0), z.shape[1], None if pos is None else pos.data_ptr(), tokens, out.data_ptr())
    return out


# --- masked decode path (contract: keep_rows_reference in vllm_griffin/ops/reference.py) ---

def _check_masks(masks: torch.Tensor, width: int) -> None:
    if masks.dtype != torch.bool or masks.dim() != 2 or masks.shape[1] != width or masks.stride(1) != 1:
        raise ValueError(f"masks must be bool [slots, {width}] with unit column stride, "
                         f"got {masks.dtype} {tuple(masks.shape)}")


def keep_rows_cpu(z: torch.Tensor, masks: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """In place: z[t, j] = 0 where not masks[slots[t], j]; returns z.

    z [T, D] float32/bfloat16 with unit column stride; masks [S, D] bool (one layer's
    rows of the expert masks, unit column stride); slots [T] int64."""
    lib = _capture_lib()
    if z.dim() != 2 or z.device.type != "cpu" or z.dtype not in _WEIGHT_SUFFIX or z.stride(1) != 1:
        raise ValueError(f"z must be a CPU float32/bfloat16 [rows, neurons] tensor with unit column stride, "
                         f"got {z.dtype} {tuple(z.shape)} strides {z.stride()} on {z.device}")
    _check_masks(masks, z.shape[1])
    slots = _index(lib, "slots", slots, z.shape[0], masks.shape[0], allow_skip=False)
    return keep_rows_unchecked(z.dtype)(z, masks, slots)


def keep_rows_unchecked(dtype: torch.dtype):
    """:func:`keep_rows_cpu` for ``dtype`` without its input checks, except z's column
    stride (a view with another stride would be written wrongly): for the decode
    step's own tensors, where the checks cost more than the kernel."""
    fn = getattr(_capture_lib(), f"griffin_keep_rows_{_WEIGHT_SUFFIX[dtype]}")

    def keep_rows(z: torch.Tensor, masks: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if z.stride(1) != 1 and z.shape[1] > 1:
            raise ValueError(f"z needs unit column stride, got strides {z.stride()}")
        fn(z.data_ptr(), z.stride(0), masks.data_ptr(), masks.stride(0), slots.data_ptr(), z.shape[0], z.shape[1])
        return z

    return keep_rows


def act_keep_cpu(gate_up: torch.Tensor, masks: torch.Tensor, slots: torch.Tensor, activation: str) -> torch.Tensor:
    """z [T, D]: z[t, j] = act(gate_up[t, j]) * gate_up[t, D + j] where masks[slots[t], j], else 0.

    gate_up [T, 2D] float32/bfloat16 with unit column stride (vLLM's merged gate_up
    output); masks [S, D] bool (one layer's rows, unit column stride); slots [T] int64;
    activation "silu" or "gelu_tanh"."""
    lib = _capture_lib()
    if activation not in FUSED_ACT_CODES:
        raise ValueError(f"activation {activation!r} is not fused; allowed: {', '.join(FUSED_ACT_CODES)}")
    if (gate_up.dim() != 2 or gate_up.device.type != "cpu" or gate_up.dtype not in _WEIGHT_SUFFIX
            or gate_up.stride(1) != 1 or gate_up.shape[1] % 2):
        raise ValueError(f"gate_up must be a CPU float32/bfloat16 [rows, 2 * neurons] tensor with unit column "
                         f"stride, got {gate_up.dtype} {tuple(gate_up.shape)} strides {gate_up.stride()} "
                         f"on {gate_up.device}")
    width = gate_up.shape[1] // 2
    _check_masks(masks, width)
    slots = _index(lib, "slots", slots, gate_up.shape[0], masks.shape[0], allow_skip=False)
    return act_keep_unchecked(gate_up.dtype, activation)(gate_up, masks, slots)


def act_keep_unchecked(dtype: torch.dtype, activation: str):
    """:func:`act_keep_cpu` for ``dtype`` and ``activation`` without its input checks,
    except gate_up's column stride: for the decode step's own tensors."""
    fn = getattr(_capture_lib(), f"griffin_act_keep_{_WEIGHT_SUFFIX[dtype]}")
    code = FUSED_ACT_CODES[activation]

    def act_keep(gate_up: torch.Tensor, masks: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if gate_up.stride(1) != 1 and gate_up.shape[1] > 1:
            raise ValueError(f"gate_up needs unit column stride, got strides {gate_up.stride()}")
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        z = torch.empty(rows, width, dtype=gate_up.dtype)
        fn(gate_up.data_ptr(), gate_up.stride(0), z.data_ptr(), width, masks.data_ptr(), masks.stride(0),
           slots.data_ptr(), rows, width, code)
        return z

    return act_keep


def gated_act_keep_unchecked(dtype: torch.dtype, activation: str):
    """:func:`act_keep_unchecked` for a step with `gated` rows, ``fn(gate_up, masks, slots, ks)``:
    row t keeps the ``ks[t]`` neurons of its pool ``masks[slots[t]]`` whose |act(gate)| is
    largest (0: the whole pool). Contract: reference.gated_keep_reference."""
    fn = getattr(_capture_lib(), f"griffin_gated_act_keep_{_WEIGHT_SUFFIX[dtype]}")
    code = FUSED_ACT_CODES[activation]

    def gated_act_keep(gate_up: torch.Tensor, masks: torch.Tensor, slots: torch.Tensor,
                       ks: torch.Tensor) -> torch.Tensor:
        if gate_up.stride(1) != 1 and gate_up.shape[1] > 1:
            raise ValueError(f"gate_up needs unit column stride, got strides {gate_up.stride()}")
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        z = torch.empty(rows, width, dtype=gate_up.dtype)
        # The C pass reads ks[t] and slots[t] as contiguous int64: a strided view (a row of a
        # transposed [L, T] table) would hand each row another row's k.
        ks, slots = ks.to(torch.int64).contiguous(), slots.to(torch.int64).contiguous()
        fn(gate_up.data_ptr(), gate_up.stride(0), z.data_ptr(), width, masks.data_ptr(), masks.stride(0),
           slots.data_ptr(), ks.data_ptr(), rows, width, code)
        return z

    return gated_act_keep
