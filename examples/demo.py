"""Dense vs GRIFFIN, side by side, on the embedded SmolLM2-135M-Instruct.

    make demo            # or: python examples/demo.py [--density 0.5] [--max-tokens 64]

One engine with GRIFFIN switched on; each prompt is sent twice in the same
batch: once at density 1.0 (dense: the full MLP, exactly plain vLLM) and once
at the chosen density (each sequence decodes on its own experts).
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from pathlib import Path

XSUM = Path(__file__).resolve().parents[2] / "shared" / "data" / "xsum_1shot_dev.jsonl"
QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Give three tips for staying focused while studying.",
    "Explain what a neural network is to a ten-year-old.",
]


def build_prompts(tokenizer, xsum_path: Path) -> list[tuple[str, str]]:
    prompts = [(q, tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True)) for q in QUESTIONS]
    if xsum_path.exists():  # one XSum 1-shot prompt from the paper's evaluation set
        row = json.loads(xsum_path.read_text().splitlines()[1])
        prompts.append(("XSum article (1-shot summary prompt)", row["article"]))
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--xsum", type=Path, default=XSUM)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams

    from vllm_griffin.models import prepare_model

    model_dir = prepare_model("smollm2-135m-instruct")
    print(f"model: {model_dir}")
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=2048, gpu_memory_utilization=0.5,
              enforce_eager=True, additional_config={"griffin": {"density": args.density}})
    prompts = build_prompts(llm.get_tokenizer(), args.xsum)

    def sampling(density: float) -> SamplingParams:
        return SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop=["###"],
                              extra_args={"griffin": {"density": density}})

    texts = [p for _, p in prompts]
    outs = llm.generate(texts + texts, [sampling(1.0)] * len(texts) + [sampling(args.density)] * len(texts))
    dense, sparse = outs[: len(texts)], outs[len(texts):]
    width = 60
    for (title, _), d, g in zip(prompts, dense, sparse):
        d_ids, g_ids = list(d.outputs[0].token_ids), list(g.outputs[0].token_ids)
        same = next((i for i, (a, b) in enumerate(zip(d_ids, g_ids)) if a != b), min(len(d_ids), len(g_ids)))
        print("\n" + "=" * (2 * width + 3))
        print(f"{title}  |  {len(d.prompt_token_ids)} prompt tokens, first {same} generated tokens identical")
        print(f"{'dense (density 1.0)':<{width}} | GRIFFIN (density {args.density})")
        print("-" * (2 * width + 3))
        left = textwrap.wrap(d.outputs[0].text.strip(), width) or [""]
        right = textwrap.wrap(g.outputs[0].text.strip(), width) or [""]
        for i in range(max(len(left), len(right))):
            print(f"{left[i] if i < len(left) else '':<{width}} | {right[i] if i < len(right) else ''}")
    print("\ndemo finished")


if __name__ == "__main__":
    main()
