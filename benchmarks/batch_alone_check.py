"""Do greedy answers in a crowded batch equal the same requests run alone?

One SmolLM2 engine with a small KV cache (vLLM preempts), 40 greedy requests of mixed
methods and densities at once, then each non-`gated`, non-refreshing request again
alone. Prints, per request, how many tokens agree and the largest top-1 log-probability
difference over them (float noise is ~1e-5), and where answers part.

    python benchmarks/batch_alone_check.py [SEED] [MODE]

MODE picks what shares the batch with the checked requests: ``mixed`` (a quarter
`gated` with its default refresh), ``gated0`` (`gated`, no refresh), ``topkrefresh``
(`topk` refreshing every 4 tokens instead), ``nogated`` (none of those).
"""

from __future__ import annotations

import random
import sys

WORDS = ("the river model cache token server layer expert neuron prompt answer quick brown fox jumps over "
         "lazy dog python function returns value every night stars shine above quiet town people walk home "
         "tell story about small robot learning paint").split()
MODES = ("mixed", "gated0", "topkrefresh", "nogated")


def requests(seed: int, mode: str) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(40):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 250)))
        options = {"method": rng.choice(["topk", "magnitude", "topk_magnitude", "gated"]),
                   "density": rng.choice([0.25, 0.5, 0.75])}
        if options["method"] == "gated":
            if mode == "nogated":
                options["method"] = "topk"
            elif mode == "gated0":
                options["refresh"] = 0
            elif mode == "topkrefresh":
                options["method"], options["refresh"] = "topk", 4
        out.append((prompt, {"griffin": options}))
    return out


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_griffin.models import prepare_model

    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    mode = sys.argv[2] if len(sys.argv) > 2 else "mixed"
    if mode not in MODES:
        raise SystemExit(f"MODE {mode!r} is invalid; allowed: {', '.join(MODES)}")
    reqs = requests(seed, mode)
    llm = LLM(model=str(prepare_model("smollm2-135m-instruct")), dtype="float32", enforce_eager=True, seed=0,
              block_size=32, num_gpu_blocks_override=24, max_model_len=736, max_num_seqs=64,
              gpu_memory_utilization=0.5, additional_config={"griffin": {"density": 0.5}}, disable_log_stats=False)

    def params(extra):
        return SamplingParams(max_tokens=96, temperature=0.0, extra_args=extra, logprobs=2)

    outs = llm.generate([p for p, _ in reqs], [params(e) for _, e in reqs], use_tqdm=False)
    print("preemptions", sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))
    parted = 0
    for (prompt, extra), batched in zip(reqs, outs):
        options = extra["griffin"]
        if options["method"] == "gated" or options.get("refresh"):
            continue
        (alone,) = llm.generate([prompt], [params(extra)], use_tqdm=False)
        a, b = batched.outputs[0], alone.outputs[0]
        t1, t2 = list(a.token_ids), list(b.token_ids)
        n = next((k for k, (x, y) in enumerate(zip(t1, t2)) if x != y), min(len(t1), len(t2)))
        dev = max((abs(a.logprobs[k][t1[k]].logprob - b.logprobs[k][t2[k]].logprob) for k in range(n)), default=0.0)
        print(f"{options['method']:15s} {options['density']:<5} agree {n:3d} of {len(t1):3d}  max|dlogp| {dev:.2e}")
        parted += n < len(t1)
    print("parted", parted)


if __name__ == "__main__":
    main()
