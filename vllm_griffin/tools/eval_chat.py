"""``vllm-griffin eval chat``: does GRIFFIN keep short chat answers sane?

XSum and HumanEval give a GRIFFIN sequence a long prompt to select its experts
from; a chat turn gives it a dozen words. This command asks the 48 short
instruction prompts in ``vllm_griffin/data/chat_prompts.jsonl`` (facts, how-to,
lists, short explanations, rewriting, simple code, math word problems; one user
message each, all under 25 words). **Prompts 0-23 are the tuning split, 24-47
the held-out split** (``--split tune|heldout|all``, default all; ``--start`` and
``--limit`` then count within the split): choose methods and settings on the
tuning split and report the held-out one.

Each prompt goes through the model's chat template (``apply_chat_template``
with the generation prompt); a model without one (a base model such as
gemma-3-270m) gets ``Question: ...\\nAnswer:`` and stops at a new
``Question:``. The JSON records which. Greedy, ``--max-tokens`` 128, dense
(``full``) and every method x density in one engine, as in ``eval xsum``.

Scores, with no reference answers: ROUGE-L (``rouge-score``, x100) of each
answer against the dense answer to the same prompt (100 = unchanged), and
degeneration: an answer is *degenerate* when fewer than half of the 4-grams of
its generated token ids are distinct (a loop), judged only on answers of at
least 16 tokens. Per (method, density): mean ROUGE-L to dense, the degenerate
count and rate, and dense's own degenerate count over the same prompts. JSON,
markdown and a PNG (both scores vs density), ``--append`` as in ``eval xsum``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_griffin.tools.eval_common import (
    EVAL_METHODS,
    FULL,
    Engine,
    EvalError,
    add_sweep_arguments,
    agreement_with_dense,
    cli_runner,
    group_cells,
    load_previous,
    method_label,
    parse_list,
    parse_request_options,
    plan_jobs,
    record_run,
    resolve_model,
    run_info,
    sampling_params,
    write_result,
)

PROMPTS_FILE = Path(__file__).resolve().parent / "data" / "chat_prompts.jsonl"
SPLITS = {"tune": (0, 24), "heldout": (24, 48), "all": (0, 48)}  # [first, end) prompt ids
NGRAM = 4
MIN_TOKENS = 16          # shorter answers are never called degenerate
DEGENERATE_BELOW = 0.5   # distinct share of 4-grams under which an answer is a loop
PLAIN_PROMPT = "Question: {prompt}\nAnswer:"
PLAIN_STOP = ("\nQuestion:",)


# -- prompts -------------------------------------------------------------------------------


def load_prompts(path: Path = PROMPTS_FILE) -> list[dict]:
    """All prompts, ``{"id", "split", "category", "prompt"}``, checked to be numbered 0..N-1."""
    prompts = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("id") != len(prompts) or not isinstance(record.get("prompt"), str):
                raise EvalError(f"{path}:{lineno}: needs 'id' = {len(prompts)} and a string 'prompt'")
            prompts.append(record)
    return prompts


def select_prompts(split: str, start: int = 0, limit: int | None = None, path: Path = PROMPTS_FILE) -> list[dict]:
    """The prompts of ``split``, then ``start .. start+limit-1`` within it."""
    if split not in SPLITS:
        raise EvalError(f"--split {split!r} is invalid; allowed: {', '.join(SPLITS)}")
    first, end = SPLITS[split]
    chosen = load_prompts(path)[first:end]
    if start < 0 or start >= len(chosen):
        raise EvalError(f"--start {start} is invalid; allowed: 0 <= start < {len(chosen)} (prompts in split {split})")
    return chosen[start:] if limit is None else chosen[start: start + limit]


def format_prompts(tokenizer, texts: list[str]) -> tuple[list, str]:
    """Engine inputs for the user messages, and which format was used.

    With a chat template the rendered text is tokenized here without special tokens
    (the template writes any BOS itself), so vLLM gets token ids and adds nothing."""
    if getattr(tokenizer, "chat_template", None):
        prompts = []
        for text in texts:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True)
            prompts.append({"prompt_token_ids": tokenizer(rendered, add_special_tokens=False).input_ids})
        return prompts, "chat_template"
    return [PLAIN_PROMPT.format(prompt=text) for text in texts], "plain"


# -- scores ----------------------------------------------------------------------------


def distinct_ngram_share(token_ids: list[int], n: int = NGRAM) -> float | None:
    """Distinct n-grams / all n-grams of a token sequence (None when it has no n-gram)."""
    grams = [tuple(token_ids[i: i + n]) for i in range(len(token_ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def is_degenerate(token_ids: list[int]) -> bool:
    """A loop: at least ``MIN_TOKENS`` tokens and under half of their 4-grams distinct."""
    if len(token_ids) < MIN_TOKENS:
        return False
    return distinct_ngram_share(token_ids) < DEGENERATE_BELOW


def summarize(samples: list[dict]) -> list[dict]:
    """Per (method, density, options): mean ROUGE-L to dense, degenerate count and rate, and
    dense's degenerate count over the same prompts (a method's own loops vs the model's)."""
    agreement_with_dense(samples, ("prompt_id",), "answer")
    dense = {s["prompt_id"]: s for s in samples if s["method"] == FULL}
    table = []
    for (method, density, _), items in group_cells(samples):
        vs_full = [s["rougeL_vs_full"] for s in items if "rougeL_vs_full" in s]
        shares = [s["distinct_4gram"] for s in items if s["distinct_4gram"] is not None]
        degenerate = sum(s["degenerate"] for s in items)
        mine = [dense[s["prompt_id"]] for s in items if s["prompt_id"] in dense]
        table.append({"method": method, "density": density, "options": items[0].get("options") or {},
                      "n": len(items), "rougeL_vs_full": sum(vs_full) / len(vs_full) if vs_full else None,
                      "degenerate": degenerate, "degenerate_rate": degenerate / len(items),
                      "full_degenerate": sum(s["degenerate"] for s in mine) if mine else None,
                      "identical_to_full": sum(s["answer"] == dense[s["prompt_id"]]["answer"]
                                               for s in items if s["prompt_id"] in dense) if mine else None,
                      "distinct_4gram": sum(shares) / len(shares) if shares else None,
                      "truncated": sum(s["finish_reason"] == "length" for s in items),
                      "generated_tokens": sum(s["generated_tokens"] for s in items) / len(items)})
    return table


def markdown_table(result: dict) -> str:
    lines = [f"**{result['model']}, chat prompts {result['prompts'][0]}-{result['prompts'][1]} "
             f"({result['split']})** (greedy, {result['max_tokens']} new tokens, {result['prompt_format']} format)", "",
             "| method | density | ROUGE-L to dense | degenerate | rate | dense degenerate | identical to dense | "
             "distinct 4-grams | hit max tokens | mean tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in result["summary"]:
        agree = "" if e["rougeL_vs_full"] is None else f"{e['rougeL_vs_full']:.1f}"
        full = "" if e["full_degenerate"] is None else str(e["full_degenerate"])
        same = "" if e["identical_to_full"] is None else f"{e['identical_to_full']}/{e['n']}"
        share = "" if e["distinct_4gram"] is None else f"{e['distinct_4gram']:.2f}"
        lines.append(f"| {method_label(e)} | {e['density']:g} | {agree} | {e['degenerate']}/{e['n']} | "
                     f"{100 * e['degenerate_rate']:.0f} % | {full} | {same} | {share} | {e['truncated']} | "
                     f"{e['generated_tokens']:.0f} |")
    return "\n".join(lines) + "\n"


# -- the sweep -------------------------------------------------------------------------


def run_chat(args: argparse.Namespace) -> dict:
    methods = parse_list(args.methods, "methods", EVAL_METHODS)
    densities = parse_list(args.densities, "densities")
    options = parse_request_options(args.request_options)
    prompts = select_prompts(args.split, args.start, args.limit)
    model_path = resolve_model(args.model)
    jobs = plan_jobs(prompts, ["greedy"], methods, densities)
    span = [prompts[0]["id"], prompts[-1]["id"]]
    out = Path(args.out)
    previous = load_previous(out, {"model": args.model, "prompts": span, "max_tokens": args.max_tokens,
                                   "dtype": args.dtype, "seed": args.seed}) if args.append else None

    with Engine(model_path, args) as engine:
        inputs, prompt_format = format_prompts(engine.tokenizer, [p["prompt"] for p in prompts])
        stop = () if prompt_format == "chat_template" else PLAIN_STOP
        engine.check_lengths(inputs, [p["id"] for p in prompts], args.max_tokens, args.max_model_len, "prompts")
        # Request seed = --seed + prompt id, whatever the split and --start (sampling_params adds the job's row).
        outputs = engine.generate(
            [inputs[j.row] for j in jobs],
            [sampling_params(j, args.max_tokens, args.seed + span[0], stop=stop, options=options) for j in jobs],
            args.chunk, f"chat {Path(args.model).name}")

    samples = []
    for j, r in zip(jobs, outputs):
        ids = list(r.outputs[0].token_ids)
        share = distinct_ngram_share(ids)
        samples.append({"method": j.method, "density": j.density, "options": {} if j.method == FULL else options,
                        "prompt_id": prompts[j.row]["id"], "category": prompts[j.row]["category"],
                        "prompt": prompts[j.row]["prompt"], "request_id": r.request_id,
                        "generated_tokens": len(ids), "finish_reason": r.outputs[0].finish_reason,
                        "answer": r.outputs[0].text.strip(),
                        "distinct_4gram": None if share is None else round(share, 4),
                        "degenerate": is_degenerate(ids),
                        # Space-separated, so the JSON stays one line per answer; the scores recompute from it.
                        "token_ids": " ".join(map(str, ids))})
    run = run_info(args, engine, len(jobs), options, methods=methods, densities=densities, split=args.split)
    result = previous or {
        "task": "chat", "model": args.model, "prompts_file": str(PROMPTS_FILE), "split": args.split,
        "splits": {"tune": [0, 23], "heldout": [24, 47]}, "prompts": span, "max_tokens": args.max_tokens,
        "dtype": args.dtype, "seed": args.seed, "sampling": "greedy (temperature 0)",
        "prompt_format": prompt_format, "plain_prompt": PLAIN_PROMPT if prompt_format == "plain" else None,
        "stop": list(stop),
        "degenerate": f"distinct {NGRAM}-grams of the generated token ids / all {NGRAM}-grams < {DEGENERATE_BELOW}"
                      f" (answers of at least {MIN_TOKENS} tokens)",
        "rouge": "rougeL_vs_full: rouge-score ROUGE-L F-measure x100 against the dense answer, use_stemmer=True",
        "runs": [], "samples": []}
    record_run(result, samples, run, summarize)
    write_outputs(result, out, args.plot)
    return result


def write_outputs(result: dict, out: Path, plot: bool = True) -> None:
    from vllm_griffin.tools.plots import plot_chat

    write_result(result, out, markdown_table(result), plot_chat if plot else None)


# -- command line ----------------------------------------------------------------------


def add_parser(tasks) -> None:
    c = tasks.add_parser(
        "chat", help="48 short chat prompts: degeneration and ROUGE-L to dense per method and density",
        description="Short instruction prompts (0-23 tuning split, 24-47 held-out) through the model's chat "
                    "template, greedy; each answer scored by ROUGE-L against the dense answer and flagged "
                    "degenerate when under half of its generated 4-grams are distinct.")
    add_sweep_arguments(c, unit="prompts", max_tokens=128, out="eval_chat.json")
    c.add_argument("--split", default="all", help="prompts: tune (0-23), heldout (24-47) or all (default); "
                                                  "--start/--limit count within it")
    c.set_defaults(func=cli_runner(run_chat), record_command=True)
