"""In-process timing of GriffinMLP calls: dense requests vs GRIFFIN requests, same engine.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/layer_time.py --model smollm2 --batch 4 --density 0.5

Runs vLLM in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the layer's
``run`` can be wrapped with a timer; alternates batches at density 1.0 and at
``--density``; prints the median time of one layer call in decode steps for
each, the median engine step, and the worker's capture / selection seconds per
prefill (``griffin_stats``). Medians: a call slowed by another process on the
machine moves a mean, not the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm_griffin.engine import layers
    from vllm_griffin.tools import bench

    calls: dict[str, list[float]] = {}
    run = layers.GriffinMLP.run

    def timed(self, x):
        plan = layers._ACTIVE_PLAN
        decode = plan is not None and plan.only_sparse
        start = time.perf_counter()
        out = run(self, x)
        if decode or plan is None or plan.all_dense:
            calls.setdefault("griffin" if decode else "dense", []).append(time.perf_counter() - start)
        return out

    layers.GriffinMLP.run = timed
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    bench_args = parser.parse_args(["bench", "--models", args.model, "--batch-sizes", str(args.batch),
                                    "--gen-len", str(args.gen_len)])
    runner = bench.Runner(args.model, bench_args, Path(tempfile.mkdtemp()))
    engine = runner.llm.llm_engine
    steps: dict[float, list[float]] = {}
    for rep in range(args.repeats):
        for density in (1.0, args.density)[:: -1 if rep % 2 else 1]:
            before = runner.stats()
            runner.run_id += 1
            for i, prompt in enumerate(runner.prompts(args.batch)):
                engine.add_request(f"layer-time-{runner.run_id}-{i}", prompt, runner.params(density, args.gen_len))
            engine.step()  # the prefill
            after = runner.stats()
            calls.clear()
            while engine.has_unfinished_requests():
                start = time.perf_counter()
                engine.step()
                steps.setdefault(density, []).append(time.perf_counter() - start)
            for kind, times in sorted(calls.items()):
                print(f"d={density} {kind} layer call: median {statistics.median(times) * 1e6:.1f} us (n={len(times)})")
            print(f"d={density} prefill: capture {after['capture_seconds'] - before['capture_seconds']:.4f} s, "
                  f"selection {after['select_seconds'] - before['select_seconds']:.4f} s")
    for density, times in steps.items():
        print(f"d={density} engine step: median {statistics.median(times) * 1e3:.2f} ms (n={len(times)})")


if __name__ == "__main__":
    main()
