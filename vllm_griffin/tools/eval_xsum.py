"""``vllm-griffin eval xsum``: what GRIFFIN costs in summary quality, in one command.

One vLLM engine with GRIFFIN switched on serves the whole sweep, because the
method and the density are per-request options: every (row, method, density)
request goes into the same ``llm.generate`` calls (in chunks, for a progress
bar), and vLLM batches them while GRIFFIN keeps each sequence's experts exact.
Density 1.0 is dense (vLLM's own MLP), reported as the method ``full``.

Settings: ``paper`` (the authors' XSum setting: temperature 0.3, top_p 1,
stop at ``###``, a fixed seed: per request where vLLM allows it) and ``greedy``
(temperature 0).
Scores: ROUGE-1/2/L F-measures (x100) from the ``rouge-score`` package, with
its Porter stemmer, averaged over rows.

Outputs: a JSON file (settings, per-row outputs and scores, per-(setting,
method, density) means), a markdown table beside it and a PNG of ROUGE-L vs
density per method. ``--append`` merges a run into an existing JSON (same
model, data and rows), so a sweep can be split into runs of a few minutes.

The sweep machinery (cells, per-request options, the engine run in chunks,
``--append`` merging, the output files, the common command-line options) lives
in :mod:`vllm_griffin.tools.eval_common`, shared with ``eval humaneval`` and
``eval chat``. This module also registers the ``eval`` command and its tasks.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vllm_griffin.tools.eval_common import (
    DEFAULT_DATA_NAME,
    EVAL_METHODS,
    FULL,
    SETTINGS,
    STOP,
    Engine,
    add_sweep_arguments,
    clean_summary,
    cli_runner,
    load_previous,
    load_rows,
    method_label,
    method_order,
    parse_list,
    parse_request_options,
    per_request_seeds_work,
    plan_jobs,
    record_run,
    resolve_data,
    resolve_model,
    rouge_scores,
    run_info,
    sampling_params,
    summarize,
    write_result,
)


def run_xsum(args: argparse.Namespace) -> dict:
    settings = parse_list(args.setting, "setting", SETTINGS)
    methods = parse_list(args.methods, "methods", EVAL_METHODS)
    densities = parse_list(args.densities, "densities")
    options = parse_request_options(args.request_options)
    data = resolve_data(args.data)
    rows = load_rows(data, args.limit, args.start)
    model_path = resolve_model(args.model)
    jobs = plan_jobs(rows, settings, methods, densities)
    out = Path(args.out)
    previous = load_previous(out, {
        "model": args.model, "rows": [rows[0]["index"], rows[-1]["index"]], "max_tokens": args.max_tokens,
        "dtype": args.dtype, "seed": args.seed}) if args.append else None

    if args.export_experts:
        os.environ["VLLM_GRIFFIN_EXPORT_DIR"] = str(Path(args.export_experts).resolve())
    prompts = [r["article"] for r in rows]
    with Engine(model_path, args) as engine:
        seeds_ok = per_request_seeds_work()
        engine.check_lengths(prompts, [r["index"] for r in rows], args.max_tokens, args.max_model_len, "rows")
        outputs = engine.generate(
            [prompts[j.row] for j in jobs],
            [sampling_params(j, args.max_tokens, args.seed if seeds_ok or j.setting == "greedy" else None,
                             options=options) for j in jobs],
            args.chunk, f"xsum {Path(args.model).name}")

    predictions = [clean_summary(r.outputs[0].text) for r in outputs]
    scores = rouge_scores(predictions, [rows[j.row]["summary_gt"] for j in jobs])
    samples = [{"setting": j.setting, "method": j.method, "density": j.density,
                "options": {} if j.method == FULL else options, "row": rows[j.row]["index"],
                "request_id": r.request_id, "generated_tokens": len(r.outputs[0].token_ids),
                "prediction": p, **s}
               for j, r, p, s in zip(jobs, outputs, predictions, scores)]
    run = run_info(args, engine, len(jobs), options, settings=settings, methods=methods, densities=densities,
                   request_seeds="all" if seeds_ok else "greedy only")
    result = previous or {
        "model": args.model, "data": str(data), "rows": [rows[0]["index"], rows[-1]["index"]],
        "max_tokens": args.max_tokens, "dtype": args.dtype, "seed": args.seed, "settings": SETTINGS,
        "stop": STOP, "rouge": "rouge-score F-measure x100, use_stemmer=True", "runs": [], "samples": []}
    record_run(result, samples, run, summarize, ("setting",))
    write_outputs(result, out, args.plot)
    return result


# -- outputs ---------------------------------------------------------------------------


def markdown_table(result: dict) -> str:
    lines = ["| setting | method | density | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-L kept (of dense) | "
             "ROUGE-L to dense output | rows |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in result["summary"]:
        kept = f"{100 * e['rougeL_retained']:.0f} %" if e["rougeL_retained"] is not None else ""
        agree = f"{e['rougeL_vs_full']:.1f}" if e.get("rougeL_vs_full") is not None else ""
        lines.append(f"| {e['setting']} | {method_label(e)} | {e['density']:g} | {e['rouge1']:.2f} | "
                     f"{e['rouge2']:.2f} | {e['rougeL']:.2f} | {kept} | {agree} | {e['rows']} |")
    return "\n".join(lines) + "\n"


def pivot_table(result: dict) -> str:
    """Per setting: one line per method, ROUGE-L (share of dense; ROUGE-L to the dense output) per density."""
    out = []
    for setting in sorted({e["setting"] for e in result["summary"]}):
        entries = [e for e in result["summary"] if e["setting"] == setting]
        dense = next((e for e in entries if e["method"] == FULL), None)
        densities = sorted({e["density"] for e in entries if e["method"] != FULL})
        rows = max(e["rows"] for e in entries)
        head = f"**{result['model']}, {setting}** ({rows} rows, {result['max_tokens']} new tokens)"
        if dense:
            head += (f": dense ROUGE-1 / 2 / L = {dense['rouge1']:.2f} / {dense['rouge2']:.2f} / {dense['rougeL']:.2f}")
        out += [head, "", "| method | " + " | ".join(f"d = {d:g}" for d in densities) + " |",
                "|---|" + "---|" * len(densities)]
        for label in method_order(method_label(e) for e in entries if e["method"] != FULL):
            cells = []
            for d in densities:
                e = next((e for e in entries if method_label(e) == label and e["density"] == d), None)
                if e is None:
                    cells.append("")
                    continue
                kept = f"{100 * e['rougeL_retained']:.0f} %" if e["rougeL_retained"] is not None else "-"
                agree = f"; {e['rougeL_vs_full']:.1f}" if e.get("rougeL_vs_full") is not None else ""
                cells.append(f"{e['rougeL']:.2f} ({kept}{agree})")
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_outputs(result: dict, out: Path, plot: bool = True) -> None:
    from vllm_griffin.tools.plots import plot_rouge_vs_density

    write_result(result, out, markdown_table(result) + "\n" + pivot_table(result),
                 plot_rouge_vs_density if plot else None)


# -- command line ----------------------------------------------------------------------


def resummarize(path: Path, plot: bool = True) -> dict:
    """Recompute the summary, table and plot of an existing results JSON (no engine)."""
    result = json.loads(Path(path).read_text())
    result["summary"] = summarize(result["samples"])
    write_outputs(result, Path(path), plot)
    return result


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="quality evaluation through vLLM with GRIFFIN (XSum ROUGE, HumanEval pass@1, "
                                    "chat degeneration)")
    tasks = p.add_subparsers(dest="task", required=True)
    x = tasks.add_parser("xsum", help="1-shot XSum summaries: ROUGE-1/2/L per method and density")
    add_sweep_arguments(x, unit="rows", max_tokens=128, out="eval_xsum.json")
    x.add_argument("--data", default=None, help=f"JSONL with article/summary_gt (default: ../{DEFAULT_DATA_NAME})")
    x.add_argument("--setting", default="paper,greedy", help="comma list of: " + ", ".join(SETTINGS))
    x.add_argument("--export-experts", default=None, help="also write every request's experts to this folder")
    x.set_defaults(func=_cli_xsum, record_command=True)
    from vllm_griffin.tools import drift, eval_chat, eval_humaneval

    eval_humaneval.add_parser(tasks)
    eval_chat.add_parser(tasks)
    drift.add_parser(tasks)


_cli_xsum = cli_runner(run_xsum)
