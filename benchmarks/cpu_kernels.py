"""Micro-benchmark of the CPU decode kernel against the dense MLP, one layer, one core.

    OMP_NUM_THREADS=1 python benchmarks/cpu_kernels.py [--hidden 2048 --width 8192]

Prints, per batch size and density, the dense MLP time (vLLM's own CPU GEMM,
oneDNN with prepacked weights, as a vLLM engine runs it), the expert kernel in
both loop orders, and the weight bandwidth / arithmetic rates that the
dispatch's CPU cost model (vllm_griffin/ops/dispatch.py) is built from.
Random experts: real prompts' experts overlap more, which only helps "union".
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from vllm_griffin.ops.cpu_kernel import experts_mlp_cpu
from vllm_griffin.ops.reference import ExpertWeights


def silu_and_mul(x):
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def bench(fn, repeats):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def fit(paths: list[str]) -> dict:
    """CPU_COST's constants from kernel results (any number of shapes), in units of the
    dense GEMM's time per neuron at one row: rows = rows_stream * P (least squares through 0,
    rows <= 2),
    union = union_stream * U + union_compute * P (least squares), dense_compute from the
    rows >= 32 cases (the GEMM's compute-bound slope)."""
    import numpy as np

    rows_fit, union_fit, dense_slopes = [], [], []
    for path in paths:
        results = json.load(open(path))
        width = results[0]["width"]
        unit = next(r["dense_ms"] for r in results if r["rows"] == 1) / width
        for r in results:
            T, k = r["rows"], int(width * r["density"])
            union = r.get("union", width * (1 - (1 - r["density"]) ** T) if T > 1 else k)  # random sets
            if T <= 2:  # where the per-row order is chosen (beyond, cache reuse flatters it)
                rows_fit.append((T * k, r["rows_ms"] / unit))
            union_fit.append((union, T * k, r["union_ms"] / unit))
            if T >= 32:
                dense_slopes.append(r["dense_ms"] / unit / (T * width))
    p, t = np.array([a for a, _ in rows_fit]), np.array([b for _, b in rows_fit])
    (stream, compute), *_ = np.linalg.lstsq(np.array([[u, q] for u, q, _ in union_fit]),
                                            np.array([y for *_, y in union_fit]), rcond=None)
    out = {"rows_stream": float(p @ t / (p @ p)), "union_stream": float(stream), "union_compute": float(compute),
           "dense_compute": float(np.median(dense_slopes))}
    print(json.dumps(out, indent=1))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fit", nargs="+", metavar="JSON", help="print CPU_COST's constants fitted to these results")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4,
                        help="distinct weight copies cycled through, so weights stream from DRAM, not L3")
    parser.add_argument("--out", default=None)
    parser.add_argument("--layout", choices=["separate", "interleaved"], default="interleaved")
    args = parser.parse_args()
    if args.fit:
        fit(args.fit)
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    H, D = args.hidden, args.width
    L = args.layers
    w_gate_up = [torch.randn(2 * D, H) for _ in range(L)]
    w_down_t = [torch.randn(D, H) for _ in range(L)]
    w_down = [w.t().contiguous() for w in w_down_t]
    from vllm import _custom_ops as vllm_ops  # the GEMM vLLM's CPU linear layers call

    packed_gate_up = [vllm_ops.create_onednn_mm(w.t(), 32) for w in w_gate_up]
    packed_down = [vllm_ops.create_onednn_mm(w.t(), 32) for w in w_down]
    layouts = {"separate": [ExpertWeights.separate(a, b) for a, b in zip(w_gate_up, w_down_t)],
               "interleaved": [ExpertWeights.interleaved(a, b) for a, b in zip(w_gate_up, w_down)]}
    layer = [0]

    def nxt():
        layer[0] = (layer[0] + 1) % L
        return layer[0]
    rows_out = []
    print(f"H={H} D={D} fp32, one thread; times in ms")
    for T in (1, 2, 4, 8, 16, 32, 64):
        x = torch.randn(T, H)
        def dense_mlp():
            i = nxt()
            return vllm_ops.onednn_mm(packed_down[i], silu_and_mul(vllm_ops.onednn_mm(packed_gate_up[i], x, None)), None)

        dense = bench(dense_mlp, args.repeats * L)
        for density in (0.25, 0.5, 0.75):
            k = int(D * density)
            experts = torch.stack([torch.randperm(D)[:k].sort().values for _ in range(T)])
            counts = torch.full((T,), k)
            def kernel(order, layout=args.layout):
                i = nxt()
                return experts_mlp_cpu(x, layouts[layout][i], experts, counts, "silu", order)

            union = bench(lambda: kernel("union"), args.repeats * L)
            per_row = bench(lambda: kernel("rows"), args.repeats * L)
            row = {"rows": T, "density": density, "width": D, "hidden": H,
                   "union": int(torch.zeros(D, dtype=torch.bool).index_fill_(0, experts.flatten(), True).sum()), "dense_ms": dense, "union_ms": union, "rows_ms": per_row,
                   "dense_GBps": 3 * D * H * 4 / dense / 1e6, "dense_GFLOPs": 2 * 3 * T * D * H / dense / 1e6,
                   "union_GFLOPs": 2 * 3 * T * k * H / union / 1e6, "speedup": dense / min(union, per_row)}
            rows_out.append(row)
            print(f"T={T:3d} d={density:.2f} dense {dense:8.2f} union {union:8.2f} rows {per_row:8.2f} "
                  f"speed-up {row['speedup']:5.2f}  dense {row['dense_GBps']:5.1f} GB/s "
                  f"{row['dense_GFLOPs']:5.1f} GFLOP/s  union {row['union_GFLOPs']:5.1f} GFLOP/s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows_out, f, indent=1)


if __name__ == "__main__":
    main()
