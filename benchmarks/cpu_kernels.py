"""Micro-benchmark of the CPU decode expert kernels against vLLM's dense MLP, one layer call, one core.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/cpu_kernels.py \
        [--shapes smollm2 qwen0.5b llama1b] [--rows 1 2 4 8 16 32] [--density 0.5] \
        [--overlap trained engine random] [--baseline HEAD] [--isa avx2] [--hot] [--out results.json]
    python benchmarks/cpu_kernels.py --fit results.json [...]   # CPU_COST's constants

Per shape (hidden H, FF width D), rows T, density and expert overlap it times

* dense -- vLLM's own CPU MLP for fp32: oneDNN GEMMs on prepacked weights
  (``onednn_mm``, as ``dispatch_cpu_unquantized_gemm`` sets up) around SiLU-and-mul;
* rows / union -- the expert kernels (``experts_mlp_cpu``, the call the engine makes,
  on the interleaved [D, 3, H] weight block);
* union_base -- with ``--baseline REV``: the union kernel of cpu_experts.c at git REV
  (e.g. the loop order before the register-tiled one);

and prints the time per layer call and the arithmetic rate, GFLOP/s of useful work:
2 * 3 * H * P for a kernel (P, "products": the rows' expert counts summed) and
2 * 3 * H * D * T for dense. By default each call reads another copy of the layer's
weights (``--min-mb`` of them in all), so weights stream from DRAM as in a model with
many layers and the rates include that stream; ``--hot`` reuses one copy (in cache as
far as it fits: the arithmetic rate alone, for small shapes).

Paths are timed in interleaved rounds; the reported time is the fastest round (a busy
neighbour on the memory bus slows rounds, never speeds them; ``--stat median`` instead).

Expert sets: ``trained`` draws each row's top-k of a shared neuron ranking plus noise
(sigma 0.6: pairwise Jaccard ~0.62 at density 0.5, union of 16 rows ~0.83 of the
neurons, like XSum prompts on SmolLM2, README "Expert overlap"); ``engine`` (sigma 1.0:
Jaccard ~0.5, union fractions 0.79 / 0.89 / 0.94 at 4 / 8 / 16 rows, as the prompts of
benchmarks/results/cpu_bench.md); ``random``: independent sets (Jaccard 1/3 at 0.5).

``--isa avx2`` caps oneDNN at AVX2 (ONEDNN_MAX_CPU_ISA) and builds the kernels without
AVX-512: the numbers of an AVX2-only CPU on an AVX-512 one.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"smollm2": (576, 1536), "qwen0.5b": (896, 4864), "llama1b": (2048, 8192)}
SIGMAS = {"trained": 0.6, "engine": 1.0, "random": None}
ROOT = Path(__file__).resolve().parents[1]
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"]}


def silu_and_mul(x):
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def bench(fn, repeats):
    """Mean ms per call of ``repeats`` calls (after one warm-up call)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def draw_experts(rows: int, width: int, k: int, overlap: str, gen: torch.Generator) -> torch.Tensor:
    """[rows, k] ascending expert indices per row (see the module docstring)."""
    sigma = SIGMAS[overlap]
    if sigma is None:
        return torch.stack([torch.randperm(width, generator=gen)[:k].sort().values for _ in range(rows)])
    base = torch.randn(width, generator=gen)
    return torch.stack([torch.topk(base + sigma * torch.randn(width, generator=gen), k).indices.sort().values
                        for _ in range(rows)])


def overlap_stats(experts: torch.Tensor, width: int) -> tuple[int, float]:
    """Union size and mean pairwise Jaccard of the rows' sets."""
    masks = torch.zeros(experts.shape[0], width, dtype=torch.bool).scatter_(1, experts, True)
    union = int(masks.any(0).sum())
    pairs = [(masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
             for a in range(len(masks)) for b in range(a + 1, len(masks))]
    return union, float(torch.stack(pairs).mean()) if pairs else 1.0


def baseline_union(rev: str, flags: list[str]):
    """The union kernel of cpu_experts.c at git ``rev``, compiled here: fn(x, weights, experts, counts)."""
    source = subprocess.run(["git", "show", f"{rev}:vllm_griffin/ops/cpu_experts.c"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="griffin_base_"))
    (tmp / "k.c").write_text(source)
    subprocess.run(["gcc", *flags, str(tmp / "k.c"), "-o", str(tmp / "k.so"), "-lm"], check=True)
    fn = ctypes.CDLL(str(tmp / "k.so")).griffin_experts_union_f32
    fn.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
                   + [ctypes.c_int])

    def run(x, w, experts, counts):
        out = torch.empty_like(x)
        fn(x.data_ptr(), w.gate.data_ptr(), w.up.data_ptr(), w.down_t.data_ptr(), w.gate.stride(0),
           experts.data_ptr(), counts.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], w.width,
           experts.shape[1], 0)
        return out
    return run


def run_shape(name: str, hidden: int, width: int, args, base) -> list[dict]:
    from vllm import _custom_ops as vllm_ops  # the GEMM vLLM's CPU linear layers call

    from vllm_griffin.ops.cpu_kernel import experts_mlp_cpu
    from vllm_griffin.ops.reference import ExpertWeights

    layer_mb = 3 * hidden * width * 4 / 2 ** 20
    copies = 1 if args.hot else max(2, math.ceil(args.min_mb / layer_mb))
    dense_w, experts_w = [], []
    for _ in range(copies):
        w_gate_up = torch.randn(2 * width, hidden) / hidden ** 0.5
        w_down = torch.randn(hidden, width) / width ** 0.5
        dense_w.append((vllm_ops.create_onednn_mm(w_gate_up.t(), 32), vllm_ops.create_onednn_mm(w_down.t(), 32)))
        experts_w.append(ExpertWeights.interleaved(w_gate_up, w_down))
    calls = copies if copies > 1 else max(1, int(0.05 / (layer_mb / 2 ** 10 / 10)))  # hot: ~50 ms a round
    print(f"\n{name}: H={hidden} D={width} fp32, isa {args.isa}, "
          f"{'one hot weight copy' if args.hot else f'{copies} weight copies'} of {layer_mb:.1f} MB, one thread; "
          f"ms per layer call (GFLOP/s of useful work)", flush=True)
    gen = torch.Generator().manual_seed(0)
    stat = min if args.stat == "min" else statistics.median
    out = []
    for T in args.rows:
        x = torch.randn(T, hidden, generator=gen)
        for density in args.density:
            k = int(width * density)
            for overlap in args.overlap if T > 1 else ["single"]:
                experts = draw_experts(T, width, k, overlap if T > 1 else "random", gen)
                counts = torch.full((T,), k, dtype=torch.int64)
                union, jaccard = overlap_stats(experts, width)
                products = T * k
                at = [0]

                def nxt():
                    at[0] = (at[0] + 1) % copies
                    return at[0]

                def dense():
                    gate_up, down = dense_w[nxt()]
                    return vllm_ops.onednn_mm(down, silu_and_mul(vllm_ops.onednn_mm(gate_up, x, None)), None)

                fns = {"dense": dense,
                       "rows": lambda: experts_mlp_cpu(x, experts_w[nxt()], experts, counts, "silu", "rows"),
                       "union": lambda: experts_mlp_cpu(x, experts_w[nxt()], experts, counts, "silu", "union")}
                if base is not None:
                    fns["union_base"] = lambda: base(x, experts_w[nxt()], experts, counts)
                times = {key: [] for key in fns}
                for _ in range(args.rounds):  # interleaved rounds: drift hits every path alike
                    for key, fn in fns.items():
                        times[key].append(bench(fn, calls))
                ms = {key: stat(v) for key, v in times.items()}
                row = {"shape": name, "hidden": hidden, "width": width, "rows": T, "density": density,
                       "overlap": overlap, "jaccard": jaccard, "union": union, "products": products,
                       "isa": args.isa, "hot": args.hot, "weight_copies": copies, "stat": args.stat}
                for key, t in ms.items():
                    flops = 6 * hidden * (width * T if key == "dense" else products)
                    row[f"{key}_ms"] = t
                    row[f"{key}_GFLOPs"] = flops / t / 1e6
                row["dense_GBps"] = 3 * width * hidden * 4 / ms["dense"] / 1e6
                row["union_GBps"] = 3 * union * hidden * 4 / ms["union"] / 1e6
                for key in ms:
                    if key != "dense":
                        row[f"speedup_{key}"] = ms["dense"] / ms[key]
                out.append(row)
                extra = (f" base {ms['union_base']:7.3f} ({row['union_base_GFLOPs']:5.1f})"
                         if "union_base" in ms else "")
                print(f"T={T:2d} {overlap:7s} J={jaccard:.2f} U/D={union / width:.2f} | "
                      f"dense {ms['dense']:7.3f} ({row['dense_GFLOPs']:5.1f}) | rows {ms['rows']:7.3f} "
                      f"({row['rows_GFLOPs']:5.1f}) | union {ms['union']:7.3f} ({row['union_GFLOPs']:5.1f}){extra} | "
                      f"x dense: rows {row['speedup_rows']:4.2f} union {row['speedup_union']:4.2f}"
                      + (f" base {row['speedup_union_base']:4.2f}" if "union_base" in ms else ""), flush=True)
    return out


def fit(paths: list[str], union_overhead: float | None = None) -> dict:
    """CPU_COST's constants from streaming (not --hot) results of any number of shapes, in the
    cost model's unit: the dense MLP's time per neuron at one row (dense(T = 1) = D):
    rows = rows_stream * P (least squares through 0, T <= 2); union = union_overhead +
    union_stream * U + union_compute * P (least squares, T >= 2; one core streams and
    computes in turn, union_overlaps=False); dense_compute = the median slope of dense per
    (T * D) where dense exceeds its one-row time by 10 % (compute-bound). Prints the worst
    relative error of the union fit and each case's predicted and measured speed-up.
    Also dense_per_row, the median of (dense / D - 1) / (T - 1): the additive form
    dense = D * (1 + dense_per_row * (T - 1)). ``union_overhead`` fixes that term (a per-call
    cost is more units for a small layer than a large one, so over shapes with a narrow
    range of U/D it trades off against union_stream); None fits it."""
    import numpy as np

    results = [r for path in paths for r in json.load(open(path)) if not r.get("hot")]
    for r in results:  # files of the earlier version of this script: random expert sets
        r.setdefault("shape", f"{r['hidden']}x{r['width']}")
        r.setdefault("overlap", "random")
        r.setdefault("products", r["rows"] * int(r["width"] * r["density"]))
        r.setdefault("union", int(r["width"] * (1 - (1 - r["density"]) ** r["rows"])))  # expected, random sets
    unit = {}
    for r in results:
        key = (r["shape"], r.get("isa", "native"))
        if r["rows"] == 1:
            unit.setdefault(key, []).append(r["dense_ms"] / r["width"])
    unit = {k: statistics.median(v) for k, v in unit.items()}
    rows_fit, union_fit, dense_slopes, dense_lines = [], [], [], []
    for r in results:
        u = unit[(r["shape"], r.get("isa", "native"))]
        D, T, P, U = r["width"], r["rows"], r["products"], r["union"]
        if T <= 2:
            rows_fit.append((P, r["rows_ms"] / u))
        if T >= 2:
            union_fit.append(((1.0, U, P), r["union_ms"] / u, r))
        if r["dense_ms"] / u > 1.1 * D:
            dense_slopes.append(r["dense_ms"] / u / (T * D))
        if T > 1:
            dense_lines.append((r["dense_ms"] / u / D - 1) / (T - 1))
    p, t = np.array([a for a, _ in rows_fit]), np.array([b for _, b in rows_fit])
    a = np.array([f for f, _, _ in union_fit])
    y = np.array([m for _, m, _ in union_fit])
    if union_overhead is None:
        (overhead, stream, compute), *_ = np.linalg.lstsq(a, y, rcond=None)
    else:
        overhead = union_overhead
        (stream, compute), *_ = np.linalg.lstsq(a[:, 1:], y - overhead, rcond=None)
    pred = a @ np.array([overhead, stream, compute])
    dense_compute = float(np.median(dense_slopes)) if dense_slopes else None
    out = {"rows_stream": float(p @ t / (p @ p)), "union_overhead": float(overhead), "union_stream": float(stream),
           "union_compute": float(compute), "union_fit_worst_rel_error": float(np.max(np.abs(pred - y) / y)),
           "dense_compute": dense_compute,
           # dense = D * (1 + dense_per_row * (T - 1)): one core streams, then computes, so the
           # GEMM's time grows from the first row on (max(D, c * T * D) underrates it at T = 4-16)
           "dense_per_row": float(np.median(dense_lines)) if dense_lines else None}
    print(json.dumps(out, indent=1))
    for (_, measured, r), predicted in zip(union_fit, pred):
        dense = r["dense_ms"] / unit[(r["shape"], r.get("isa", "native"))]
        print(f"{r['shape']:9s} {r.get('isa', 'native'):6s} T={r['rows']:2d} {r['overlap']:7s} "
              f"U/D={r['union'] / r['width']:.2f} union x dense: measured {dense / measured:4.2f} "
              f"fitted {dense / predicted:4.2f}")
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fit", nargs="+", metavar="JSON", help="print CPU_COST's constants fitted to these results")
    parser.add_argument("--union-overhead", type=float, help="with --fit: this union_overhead, not a fitted one")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help=f"of {', '.join(SHAPES)}, or HxD")
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--density", nargs="+", type=float, default=[0.5])
    parser.add_argument("--overlap", nargs="+", choices=list(SIGMAS), default=["trained", "engine"])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--stat", choices=["min", "median"], default="min", help="of the rounds")
    parser.add_argument("--min-mb", type=float, default=512, help="weight copies cycled through, in all")
    parser.add_argument("--hot", action="store_true", help="one weight copy, reused (cache-resident if it fits)")
    parser.add_argument("--isa", choices=list(ISA_FLAGS), default="native")
    parser.add_argument("--baseline", metavar="REV", help="also time the union kernel of cpu_experts.c at git REV")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.fit:
        fit(args.fit, args.union_overhead)
        return
    if args.isa != "native":
        os.environ["ONEDNN_MAX_CPU_ISA"] = args.isa.upper()  # before oneDNN's first use
    from vllm_griffin.ops import cpu_kernel

    cpu_kernel.FLAGS = cpu_kernel.FLAGS + ISA_FLAGS[args.isa]  # its own cached build
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = baseline_union(args.baseline, cpu_kernel.FLAGS) if args.baseline else None
    results = []
    for shape in args.shapes:
        hidden, width = SHAPES[shape] if shape in SHAPES else map(int, shape.split("x"))
        results += run_shape(shape, hidden, width, args, base)
        if args.out:  # after each shape: a long run keeps what it has
            Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
