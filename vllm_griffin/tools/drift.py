"""``vllm-griffin eval drift``: short prompt, long generation.

A known critique of prompt-only selection: with a short prompt the statistic
sees few tokens, and a long generation may wander away from what the prompt
was about. For prompts of 16-64 tokens and 256 generated tokens this measures,
per method and density, how far GRIFFIN drifts from the dense model:

* first divergence: the first position where GRIFFIN's own greedy continuation
  differs from the dense greedy continuation (= length when they never differ);
* KL along the dense continuation: both models read the dense continuation
  (teacher forcing) and KL(dense || GRIFFIN) of the next-token distributions
  is averaged per position window, which shows whether it grows with distance.

Runs on the Hugging Face model in float32 (full distributions are needed; vLLM
returns only top logprobs) with :mod:`vllm_griffin.tools.hf_griffin`, the same
selection code as the engine. Prompts: the start of the XSum articles (the
article under test in each 1-shot prompt), cut to 16, 32 and 64 tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

WINDOW = 32


def short_prompts(rows: list[dict], tokenizer, lengths: list[int], per_length: int) -> list[list[int]]:
    """Token ids of the article under test, cut to each length (1-shot example left out)."""
    prompts = []
    for n in lengths:
        for row in rows[:per_length]:
            article = row["article"].split("Article:")[-1].split("\n\nSummarize")[0].strip()
            ids = tokenizer(article).input_ids
            if len(ids) < n:
                continue
            prompts.append(ids[:n])
    return prompts


def first_divergence(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def run_drift(args) -> dict:
    from vllm_griffin.core.algorithm import METHODS
    from vllm_griffin.tools import hf_griffin
    from vllm_griffin.tools.eval_common import load_rows, parse_list, resolve_data, resolve_model

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)  # beside a running engine, 1 avoids oversubscribing
    methods = parse_list(args.methods, "methods", METHODS)
    densities = parse_list(args.densities, "densities")
    lengths = [int(x) for x in args.prompt_lengths.split(",")]
    model_path = resolve_model(args.model)
    model, tokenizer = hf_griffin.load_hf_model(model_path)
    weights = hf_griffin.layer_weights(model)
    rows = load_rows(resolve_data(args.data))
    prompts = short_prompts(rows, tokenizer, lengths, args.prompts)
    cells = [(m, d) for m in methods for d in densities]
    from tqdm import tqdm

    started = time.perf_counter()
    records = []
    for ids in tqdm(prompts, desc="drift", unit="prompt", file=sys.stderr):
        out, acts = hf_griffin.prefill(model, ids)
        dense_tokens, dense_lp = hf_griffin.greedy(model, out, args.max_tokens)
        for method, density in cells:
            experts = hf_griffin.select(acts, density, method, weights)
            with hf_griffin.experts_only(model, experts):
                sparse_lp = hf_griffin.teacher_forced(model, out, dense_tokens)
                sparse_tokens, _ = hf_griffin.greedy(model, out, args.max_tokens)
            kl = (dense_lp.exp() * (dense_lp - sparse_lp)).sum(-1).clamp_min(0)
            records.append({"prompt_len": len(ids), "method": method, "density": density,
                            "first_divergence": first_divergence(dense_tokens, sparse_tokens),
                            "kl_mean": kl.mean().item(),
                            "kl_windows": [kl[i: i + WINDOW].mean().item() for i in range(0, len(kl), WINDOW)],
                            "top1_agreement": (sparse_lp.argmax(-1) == dense_lp.argmax(-1)).float().mean().item()})
    summary = []
    for method, density in cells:
        for n in lengths + ["all"]:
            rs = [r for r in records if r["method"] == method and r["density"] == density
                  and (n == "all" or r["prompt_len"] == n)]
            if not rs:
                continue
            windows = list(zip(*[r["kl_windows"] for r in rs]))
            summary.append({
                "method": method, "density": density, "prompt_len": n, "prompts": len(rs),
                "first_divergence_median": statistics.median(r["first_divergence"] for r in rs),
                "first_divergence_mean": statistics.fmean(r["first_divergence"] for r in rs),
                "kl_mean": statistics.fmean(r["kl_mean"] for r in rs),
                "top1_agreement": statistics.fmean(r["top1_agreement"] for r in rs),
                "kl_by_window": [statistics.fmean(w) for w in windows]})
    result = {"model": args.model, "max_tokens": args.max_tokens, "window": WINDOW, "prompt_lengths": lengths,
              "elapsed_s": round(time.perf_counter() - started, 1), "summary": summary, "records": records}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_table(result))
    from vllm_griffin.tools.plots import plot_drift

    plot_drift(result, out.with_suffix(".png"))
    print(markdown_table(result))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return result


def markdown_table(result: dict) -> str:
    n = result["max_tokens"]
    lines = [f"| method | density | prompt tokens | prompts | first divergence (median / mean, of {n}) | "
             f"mean KL along dense | KL first {result['window']} | KL last {result['window']} | top-1 agreement |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in result["summary"]:
        w = e["kl_by_window"]
        lines.append(f"| {e['method']} | {e['density']:g} | {e['prompt_len']} | {e['prompts']} | "
                     f"{e['first_divergence_median']:g} / {e['first_divergence_mean']:.1f} | {e['kl_mean']:.3f} | "
                     f"{w[0]:.3f} | {w[-1]:.3f} | {100 * e['top1_agreement']:.0f} % |")
    return "\n".join(lines) + "\n"


def add_parser(tasks) -> None:
    p = tasks.add_parser("drift", help="short prompt, long generation: divergence and KL vs dense (HF model)")
    p.add_argument("--model", required=True, help="embedded model name or HF folder")
    p.add_argument("--data", default=None, help="XSum JSONL whose articles give the prompts")
    p.add_argument("--prompt-lengths", default="16,32,64")
    p.add_argument("--prompts", type=int, default=4, help="prompts per length")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--methods", default="topk")
    p.add_argument("--densities", default="0.25,0.5,0.75")
    p.add_argument("--out", default="drift.json")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.set_defaults(func=_cli_drift)


def _cli_drift(args: argparse.Namespace) -> int:
    from vllm_griffin.tools.eval_common import EvalError

    try:
        run_drift(args)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
