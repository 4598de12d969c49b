"""Memory GRIFFIN's exact prefix caching needs, and the KV capacity it costs.

Each KV block carries the summed statistic of the prompt tokens it holds: one fp32
number per FF neuron and layer (``layers * D * 4`` bytes), next to the block's keys
and values (``2 * layers * kv_heads * head_dim * block_size * kv_bytes``). Those rows
live in host memory, outside vLLM's KV budget (``GriffinState.enable_block_stats``),
so the KV cache keeps every block; the table gives the host memory they take, as a
share of the KV cache's size.

    python benchmarks/prefix_cache_memory.py            # the table, from the shapes
    python benchmarks/prefix_cache_memory.py --measure  # + KV blocks of real engines, with and without GRIFFIN

``--measure`` starts two CPU engines (SmolLM2-135M, prefix caching on, the same KV
budget), one after the other, and prints how many KV blocks each got.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# name: (layers, FF width D, KV heads, head dim) from the models' config.json
SHAPES = {
    "SmolLM2-135M": (30, 1536, 3, 64),
    "Llama-3.2-1B": (16, 8192, 8, 64),
    "Llama-3-8B / Mistral-7B": (32, 14336, 8, 128),
    "Qwen2.5-7B": (28, 18944, 4, 128),
    "Llama-3-70B": (80, 28672, 8, 128),
}
STAT_BYTES = 4  # fp32 sums: the selection must not depend on a cache hit


def overhead(layers: int, width: int, kv_heads: int, head_dim: int, block_size: int, kv_bytes: int) -> float:
    """Statistic bytes per KV-block byte (layers cancel)."""
    stat = layers * width * STAT_BYTES
    kv = 2 * layers * kv_heads * head_dim * block_size * kv_bytes
    return stat / kv


def table() -> None:
    print("| model | block size | host memory for the statistic, per GiB of KV cache | KV capacity lost |")
    print("|---|---|---|---|")
    for name, shape in SHAPES.items():
        for block_size, kv_bytes, label in ((16, 2, "16 (GPU default), bf16 KV"),
                                            (128, 2, "128 (CPU default), bf16 KV")):
            ratio = overhead(*shape, block_size, kv_bytes)
            print(f"| {name} | {label} | {ratio:.2f} GiB | 0 % |")


_CHILD = r"""
import json, sys
from vllm import LLM
griffin = sys.argv[2] == "on"
extra = {"additional_config": {"griffin": {"density": 0.5}}} if griffin else {}
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, enable_prefix_caching=True,
          max_model_len=1024, seed=0, **extra)
cfg = llm.llm_engine.vllm_config.cache_config
out = {"griffin": griffin, "kv_blocks": cfg.num_gpu_blocks, "block_size": cfg.block_size}
if griffin:
    (stats,) = llm.collective_rpc("griffin_stats")
    out["statistic_rows"] = stats["block_stat_rows"]
print("RESULT " + json.dumps(out), flush=True)
"""


def measure(model: str) -> dict:
    """KV blocks vLLM gives the same budget without and with GRIFFIN (prefix caching on)."""
    from vllm_griffin.tools.models import MODELS, prepare_model

    path = str(prepare_model(model)) if model in MODELS else model
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_LOGGING_LEVEL": "WARNING"}
    runs = {}
    for mode in ("off", "on"):
        proc = subprocess.run([sys.executable, "-c", _CHILD, path, mode], env=env, capture_output=True, text=True,
                              timeout=900)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"engine ({mode}) failed:\n{proc.stderr[-3000:]}")
        runs[mode] = json.loads(line[len("RESULT "):])
    lost = 1 - runs["on"]["kv_blocks"] / runs["off"]["kv_blocks"]
    return {"model": model, "without_griffin": runs["off"], "with_griffin": runs["on"], "kv_capacity_lost": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="also start two engines and compare their KV blocks")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded model name or a HF folder")
    parser.add_argument("--out", help="JSON of the measurement")
    args = parser.parse_args()
    table()
    if args.measure:
        result = measure(args.model)
        print(f"\n{args.model}, prefix caching on, the same KV budget: {result['without_griffin']['kv_blocks']} KV "
              f"blocks without GRIFFIN, {result['with_griffin']['kv_blocks']} with it "
              f"(KV capacity lost: {100 * result['kv_capacity_lost']:.1f} %; statistic rows in host memory: "
              f"{result['with_griffin']['statistic_rows']})")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
