"""Dense vs GRIFFIN at two densities, on the embedded SmolLM2-135M-Instruct.

    make demo            # or: python examples/demo.py [--densities 0.75,0.5] [--max-tokens 96]
                         #     [--method NAME] [--model NAME]

One engine with GRIFFIN switched on and nothing else set (the default method);
the same chat prompts run dense (density 1.0: the full MLP, exactly plain vLLM)
and at each density, one generate call per setting so each gets its own speed.
Each answer is flagged when its tokens repeat (under half of its 4-grams
distinct: the same test as `vllm-griffin eval chat`).
"""

from __future__ import annotations

import argparse
import os
import textwrap
import time

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Give three tips for staying focused while studying.",
    "Explain what a neural network is to a ten-year-old.",
    "Write a Python function that returns the largest of three numbers.",
]
WIDTH = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded model name")
    parser.add_argument("--densities", default="0.75,0.5", help="comma list, 0 < d < 1")
    parser.add_argument("--method", default=None, help="selection method (default: the engine's default)")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    densities = [float(d) for d in args.densities.split(",")]
    # The answers are the point: vLLM's start-up log stays out of the way.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams

    from vllm_griffin.core import algorithm
    from vllm_griffin.core.config import GriffinConfig
    from vllm_griffin.tools.eval_chat import is_degenerate
    from vllm_griffin.tools.models import prepare_model

    model_dir = prepare_model(args.model)
    griffin = {"method": args.method} if args.method else {}
    print(f"model {args.model} ({model_dir}); starting vLLM with GRIFFIN on ...", flush=True)
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=2048, gpu_memory_utilization=0.5,
              enforce_eager=True, additional_config={"griffin": griffin})
    if args.method:
        method = args.method
    else:  # what a user who sets nothing gets
        default = GriffinConfig()
        refresh, guard = default.refresh, default.loop_guard
        refresh = algorithm.DEFAULT_REFRESH.get(default.method, 0) if refresh is None else refresh
        guard = algorithm.DEFAULT_LOOP_GUARD.get(default.method, 0) if guard is None else guard
        method = (f"default: {default.method}" + (f", refresh {refresh}" if refresh else "")
                  + (f", loop guard {guard}" if guard else ""))
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in QUESTIONS]

    settings = [("dense", 1.0)] + [(f"GRIFFIN ({method}) at density {d:g}", d) for d in densities]
    results = {}
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up, untimed
    for label, density in settings:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                extra_args={"griffin": {"density": density}})
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        results[label] = (outs, tokens / seconds)

    for i, question in enumerate(QUESTIONS):
        print("\n" + "=" * WIDTH + f"\n{question}\n" + "=" * WIDTH)
        for label, _ in settings:
            outs, speed = results[label]
            ids = list(outs[i].outputs[0].token_ids)
            flag = "  [REPEATS ITSELF]" if is_degenerate(ids) else ""
            print(f"--- {label}{flag}")
            print(textwrap.fill(outs[i].outputs[0].text.strip(), WIDTH) or "(empty)")
    print("\n" + "-" * WIDTH)
    for label, _ in settings:
        outs, speed = results[label]
        bad = sum(is_degenerate(list(o.outputs[0].token_ids)) for o in outs)
        print(f"{label:<40} {speed:7.1f} tok/s (batch of {len(QUESTIONS)}, prefill included)   "
              f"answers repeating themselves: {bad}/{len(outs)}")
    print("\ndemo finished")


if __name__ == "__main__":
    main()
