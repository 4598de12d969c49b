"""Memory GRIFFIN's exact prefix caching adds beside vLLM's KV cache.

Each KV block carries the summed statistic of the prompt tokens it holds: one
fp32 number per FF neuron and layer (``layers * D * 4`` bytes), next to the
block's keys and values (``2 * layers * kv_heads * head_dim * block_size * kv_bytes``).
The worker shrinks the number of blocks so that both fit in vLLM's KV budget
(``GriffinWorker.determine_available_memory``), so the cost shows up as fewer
cacheable tokens, never as an out-of-memory error.

    python benchmarks/prefix_cache_memory.py          # markdown table on stdout
"""

from __future__ import annotations

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


def main() -> None:
    print("| model | block size | KV dtype | statistic / KV | share of the KV budget |")
    print("|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        for block_size, kv_bytes, dtype in ((16, 2, "bf16 (GPU default block)"), (128, 2, "bf16 (CPU default block)")):
            ratio = overhead(*shape, block_size, kv_bytes)
            print(f"| {name} | {block_size} | {dtype} | {ratio:.1%} | {ratio / (1 + ratio):.1%} |")


if __name__ == "__main__":
    main()
