"""Micro-benchmark of the prefill capture, one layer, one core: torch reference vs C kernel.

    python benchmarks/capture_kernel.py [--tokens 2048 --width 8192 --slots 64 --repeats 10]

z [tokens, width] holds one prefill step's activations; every token is captured
(pos = all rows), token t goes to accumulator slot t // (tokens / slots) (32
tokens per slot by default, i.e. 64 prompts in the step), no block rows. Times
both dtypes vLLM's CPU backend runs (float32, bfloat16) and the tensor-parallel
form (norms given). torch runs on one thread, as vLLM's CPU worker does.
"""

from __future__ import annotations

import argparse
import json

import torch
from cpu_kernels import bench  # this folder (run as a script)

from vllm_griffin.ops.cpu_kernel import capture_cpu, load
from vllm_griffin.ops.reference import capture_reference


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    assert load() is not None, "the C kernel did not build"
    pos = torch.arange(args.tokens)
    acc_idx = pos * args.slots // args.tokens
    acc = torch.zeros(args.slots, args.width)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        z = torch.randn(args.tokens, args.width).to(dtype)
        norms = z.float().square().sum(-1, keepdim=True)
        for given in (None, norms):
            times = {name: bench(lambda: fn(z, pos, given, acc, acc_idx, None, None), args.repeats)
                     for name, fn in (("reference", capture_reference), ("kernel", capture_cpu))}
            row = {"dtype": str(dtype).removeprefix("torch."), "norms_given": given is not None,
                   "reference_ms": round(times["reference"], 2), "kernel_ms": round(times["kernel"], 2),
                   "speedup": round(times["reference"] / times["kernel"], 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"z [{args.tokens}, {args.width}], {args.slots} slots, one thread; ms per layer")


if __name__ == "__main__":
    main()
