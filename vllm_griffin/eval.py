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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from vllm_griffin.algorithm import METHODS

DEFAULT_DATA_NAME = Path("shared") / "data" / "xsum_1shot_dev.jsonl"
SETTINGS: dict[str, dict[str, float]] = {
    "paper": {"temperature": 0.3, "top_p": 1.0},
    "greedy": {"temperature": 0.0},
}
FULL = "full"  # density 1.0: the dense model
EVAL_METHODS = (FULL,) + METHODS
DEFAULT_METHODS = (FULL, "topk", "magnitude", "random", "sample", "topk_sample")
DEFAULT_DENSITIES = (0.25, 0.5, 0.75)
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
STOP = "###"


class EvalError(ValueError):
    """Bad input to the evaluation; the message says what was given and what is allowed."""


# -- inputs ------------------------------------------------------------------------------


def default_data_candidates() -> list[Path]:
    """Where ``../shared/data/xsum_1shot_dev.jsonl`` may be: beside the working
    directory's parent, or beside the repository's parent (a clone next to shared/)."""
    repo = Path(__file__).resolve().parents[1]
    seen: list[Path] = []
    for base in (Path.cwd().parent, Path.cwd(), repo.parent, repo):
        path = (base / DEFAULT_DATA_NAME).resolve()
        if path not in seen:
            seen.append(path)
    return seen


def resolve_data(path: str | os.PathLike | None) -> Path:
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise EvalError(f"--data {str(path)!r} is not a file; give a JSONL with 'article' and 'summary_gt' per line")
        return path
    candidates = default_data_candidates()
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise EvalError(f"no XSum data found (tried {tried}); pass --data PATH to a JSONL with 'article' and 'summary_gt'")


def load_rows(path: Path, limit: int | None = None, start: int = 0) -> list[dict[str, Any]]:
    """Rows ``start .. start+limit-1`` as ``{"index", "article", "summary_gt"}``."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            missing = [k for k in ("article", "summary_gt") if not isinstance(record.get(k), str)]
            if missing:
                raise EvalError(f"{path}:{lineno}: missing string field(s) {', '.join(missing)}; "
                                "each line needs 'article' (the prompt) and 'summary_gt' (the reference)")
            rows.append({"index": len(rows), "article": record["article"], "summary_gt": record["summary_gt"]})
    if start < 0 or start >= len(rows):
        raise EvalError(f"--start {start} is invalid; allowed: 0 <= start < {len(rows)} (rows in {path})")
    end = len(rows) if limit is None else min(len(rows), start + limit)
    return rows[start:end]


def parse_list(text: str, kind: str, allowed: Iterable[str] | None = None) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise EvalError(f"--{kind} {text!r} is empty")
    if kind == "densities":
        values = []
        for item in items:
            try:
                value = float(item)
            except ValueError:
                raise EvalError(f"--densities: {item!r} is invalid; allowed: numbers with 0 < d <= 1") from None
            if not 0.0 < value <= 1.0:
                raise EvalError(f"--densities: {item!r} is invalid; allowed: numbers with 0 < d <= 1")
            values.append(value)
        return values
    allowed = tuple(allowed or ())
    for item in items:
        if item not in allowed:
            raise EvalError(f"--{kind}: {item!r} is invalid; allowed: {', '.join(allowed)}")
    return items


# -- the sweep -------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    setting: str
    method: str
    density: float
    row: int           # index into the loaded rows


def plan_jobs(rows: list[dict], settings: list[str], methods: list[str], densities: list[float]) -> list[Job]:
    """Every (setting, method, density, row); ``full`` and density 1.0 both mean dense, asked once.

    A row's requests are adjacent, so with ``--prefix-caching`` its later requests
    find the prompt's KV blocks (and their statistic rows) still cached."""
    cells: list[tuple[str, float]] = []
    if FULL in methods or 1.0 in densities:
        cells.append((FULL, 1.0))
    cells += [(m, d) for m in methods if m != FULL for d in densities if d < 1.0]
    return [Job(setting, m, d, r) for r in range(len(rows)) for setting in settings for m, d in cells]


def sampling_params(job: Job, max_tokens: int, seed: int | None):
    from vllm import SamplingParams

    extra = {"griffin": {"density": job.density, "method": "topk" if job.method == FULL else job.method}}
    # The same seed for a row in every cell: differences come from the experts, not the dice.
    # Greedy requests carry it too: GRIFFIN's random/sampling methods draw from it.
    request_seed = None if seed is None else seed + job.row
    return SamplingParams(max_tokens=max_tokens, stop=[STOP], seed=request_seed, extra_args=extra,
                          **SETTINGS[job.setting])


def per_request_seeds_work() -> bool:
    """vLLM 0.32's CPU runner rewinds a seeded request's generator after a partial
    prefill chunk, which CPU generators refuse ("CPU Generator does not use offset").
    There sampled (paper-setting) requests go without a seed and the engine seed
    fixes the run (reproducible for the same command, but a row's draws then depend
    on its batch, and GRIFFIN's random/sampling methods use the engine config's seed).
    Greedy requests keep theirs: greedy sampling never touches the generator."""
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def clean_summary(text: str) -> str:
    # vLLM already stops at "###"; a model may still open a new example on the next line.
    return text.split(STOP)[0].strip()


def rouge_scores(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    try:
        from rouge_score import rouge_scorer
    except ImportError:  # pragma: no cover - depends on the install
        raise SystemExit("rouge-score is not installed: pip install 'vllm-griffin[eval]' (or `make setup`)")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    return [{k: 100.0 * v.fmeasure for k, v in scorer.score(ref, pred).items()}
            for pred, ref in zip(predictions, references)]


def agreement_with_dense(samples: list[dict]) -> None:
    """Set each sample's ``rougeL_vs_full``: ROUGE-L of its summary against the dense
    summary of the same row and setting. With a small model the reference summaries
    match loosely and the mean over a few rows is noisy; closeness to dense is the
    more direct measure of what GRIFFIN changed."""
    dense = {(s["setting"], s["row"]): s["prediction"] for s in samples if s["method"] == FULL}
    todo = [s for s in samples if (s["setting"], s["row"]) in dense]
    scores = rouge_scores([s["prediction"] for s in todo], [dense[(s["setting"], s["row"])] for s in todo])
    for s, score in zip(todo, scores):
        # Two empty summaries agree fully; rouge-score would say 0.
        same = s["prediction"].strip() == dense[(s["setting"], s["row"])].strip()
        s["rougeL_vs_full"] = 100.0 if same else score["rougeL"]


def summarize(samples: list[dict]) -> list[dict]:
    """Mean ROUGE per (setting, method, density), sorted."""
    agreement_with_dense(samples)
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        groups.setdefault((s["setting"], s["method"], s["density"]), []).append(s)
    table = []
    for (setting, method, density), items in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        entry = {"setting": setting, "method": method, "density": density, "rows": len(items)}
        for key in ROUGE_KEYS:
            entry[key] = sum(s[key] for s in items) / len(items)
        vs_full = [s["rougeL_vs_full"] for s in items if "rougeL_vs_full" in s]
        entry["rougeL_vs_full"] = sum(vs_full) / len(vs_full) if vs_full else None
        table.append(entry)
    for entry in table:  # share of dense quality kept, from the same setting
        dense = next((e for e in table if e["setting"] == entry["setting"] and e["method"] == FULL), None)
        entry["rougeL_retained"] = entry["rougeL"] / dense["rougeL"] if dense and dense["rougeL"] > 0 else None
    return table


def resolve_model(name_or_path: str) -> Path:
    from vllm_griffin.models import MODELS, prepare_model

    if name_or_path in MODELS:
        return prepare_model(name_or_path)
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    raise EvalError(f"--model {name_or_path!r} is invalid; allowed: {', '.join(sorted(MODELS))} "
                    "or a Hugging Face model folder (with config.json)")


def run_xsum(args: argparse.Namespace) -> dict:
    settings = parse_list(args.setting, "setting", SETTINGS)
    methods = parse_list(args.methods, "methods", EVAL_METHODS)
    densities = parse_list(args.densities, "densities")
    data = resolve_data(args.data)
    rows = load_rows(data, args.limit, args.start)
    model_path = resolve_model(args.model)
    jobs = plan_jobs(rows, settings, methods, densities)
    out = Path(args.out)
    previous = _load_previous(out, args, data, rows) if args.append else None

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.export_experts:
        os.environ["VLLM_GRIFFIN_EXPORT_DIR"] = str(Path(args.export_experts).resolve())
    from tqdm import tqdm
    from vllm import LLM

    started = time.perf_counter()
    llm = LLM(model=str(model_path), dtype=args.dtype, enforce_eager=True, gpu_memory_utilization=0.5,
              max_model_len=args.max_model_len, seed=args.seed, enable_prefix_caching=args.prefix_caching,
              additional_config={"griffin": {"density": 0.5}})
    engine_s = time.perf_counter() - started
    tokenizer = llm.get_tokenizer()
    prompts = [r["article"] for r in rows]
    too_long = [r["index"] for r, p in zip(rows, prompts)
                if len(tokenizer(p).input_ids) + args.max_tokens > args.max_model_len]
    if too_long:
        raise EvalError(f"rows {too_long[:5]} need more than --max-model-len {args.max_model_len} tokens")

    seeds_ok = per_request_seeds_work()
    outputs = []
    gen_started = time.perf_counter()
    with tqdm(total=len(jobs), desc=f"xsum {Path(args.model).name}", unit="req", file=sys.stderr) as bar:
        for i in range(0, len(jobs), args.chunk):
            chunk = jobs[i: i + args.chunk]
            results = llm.generate([prompts[j.row] for j in chunk],
                                   [sampling_params(j, args.max_tokens, args.seed if seeds_ok or
                                                    j.setting == "greedy" else None) for j in chunk],
                                   use_tqdm=False)
            outputs += [(j, r) for j, r in zip(chunk, results)]
            bar.update(len(chunk))
    generate_s = time.perf_counter() - gen_started
    llm.llm_engine.engine_core.shutdown()

    predictions = [clean_summary(r.outputs[0].text) for _, r in outputs]
    scores = rouge_scores(predictions, [rows[j.row]["summary_gt"] for j, _ in outputs])
    samples = [{"setting": j.setting, "method": j.method, "density": j.density, "row": rows[j.row]["index"],
                "request_id": r.request_id, "generated_tokens": len(r.outputs[0].token_ids),
                "prediction": p, **s}
               for (j, r), p, s in zip(outputs, predictions, scores)]
    run_info = {"settings": settings, "methods": methods, "densities": densities, "engine_start_s": round(engine_s, 1),
                "generate_s": round(generate_s, 1), "requests": len(jobs),
                "request_seeds": "all" if seeds_ok else "greedy only",
                "command": "vllm-griffin " + " ".join(sys.argv[1:]) if args.record_command else None}
    result = previous or {
        "model": args.model, "data": str(data), "rows": [rows[0]["index"], rows[-1]["index"]],
        "max_tokens": args.max_tokens, "dtype": args.dtype, "seed": args.seed, "settings": SETTINGS,
        "stop": STOP, "rouge": "rouge-score F-measure x100, use_stemmer=True", "runs": [], "samples": []}
    keys = {(s["setting"], s["method"], s["density"]) for s in samples}
    result["samples"] = [s for s in result["samples"] if (s["setting"], s["method"], s["density"]) not in keys]
    result["samples"] += samples
    result["runs"].append(run_info)
    result["summary"] = summarize(result["samples"])
    write_outputs(result, out, args.plot)
    return result


def _load_previous(out: Path, args, data: Path, rows: list[dict]) -> dict | None:
    if not out.is_file():
        return None
    previous = json.loads(out.read_text())
    mine = {"model": args.model, "rows": [rows[0]["index"], rows[-1]["index"]], "max_tokens": args.max_tokens,
            "dtype": args.dtype, "seed": args.seed}
    for key, value in mine.items():
        if previous.get(key) != value:
            raise EvalError(f"--append: {out} has {key}={previous.get(key)!r}, this run has {value!r}; "
                            "use another --out or the same settings")
    return previous


# -- outputs ---------------------------------------------------------------------------


def markdown_table(result: dict) -> str:
    lines = ["| setting | method | density | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-L kept (of dense) | "
             "ROUGE-L to dense output | rows |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in result["summary"]:
        kept = f"{100 * e['rougeL_retained']:.0f} %" if e["rougeL_retained"] is not None else ""
        agree = f"{e['rougeL_vs_full']:.1f}" if e.get("rougeL_vs_full") is not None else ""
        lines.append(f"| {e['setting']} | {e['method']} | {e['density']:g} | {e['rouge1']:.2f} | {e['rouge2']:.2f} | "
                     f"{e['rougeL']:.2f} | {kept} | {agree} | {e['rows']} |")
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
        for method in [m for m in EVAL_METHODS if m != FULL]:
            cells = []
            for d in densities:
                e = next((e for e in entries if e["method"] == method and e["density"] == d), None)
                if e is None:
                    cells.append("")
                    continue
                kept = f"{100 * e['rougeL_retained']:.0f} %" if e["rougeL_retained"] is not None else "-"
                agree = f"; {e['rougeL_vs_full']:.1f}" if e.get("rougeL_vs_full") is not None else ""
                cells.append(f"{e['rougeL']:.2f} ({kept}{agree})")
            if any(cells):
                out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_outputs(result: dict, out: Path, plot: bool = True) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_table(result) + "\n" + pivot_table(result))
    if plot:
        from vllm_griffin.plots import plot_rouge_vs_density

        plot_rouge_vs_density(result, out.with_suffix(".png"))
    print(markdown_table(result))
    print(f"wrote {out}, {out.with_suffix('.md')}" + (f", {out.with_suffix('.png')}" if plot else ""))


# -- command line ----------------------------------------------------------------------


def resummarize(path: Path, plot: bool = True) -> dict:
    """Recompute the summary, table and plot of an existing results JSON (no engine)."""
    result = json.loads(Path(path).read_text())
    result["summary"] = summarize(result["samples"])
    write_outputs(result, Path(path), plot)
    return result


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="quality evaluation (ROUGE on XSum) through vLLM with GRIFFIN")
    tasks = p.add_subparsers(dest="task", required=True)
    x = tasks.add_parser("xsum", help="1-shot XSum summaries: ROUGE-1/2/L per method and density")
    x.add_argument("--model", required=True, help="embedded model name (smollm2-135m-instruct, gemma-3-270m) or HF folder")
    x.add_argument("--data", default=None, help=f"JSONL with article/summary_gt (default: ../{DEFAULT_DATA_NAME})")
    x.add_argument("--limit", type=int, default=None, help="rows to evaluate (default: all)")
    x.add_argument("--start", type=int, default=0, help="first row")
    x.add_argument("--setting", default="paper,greedy", help="comma list of: " + ", ".join(SETTINGS))
    x.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma list of: " + ", ".join(EVAL_METHODS))
    x.add_argument("--densities", default=",".join(map(str, DEFAULT_DENSITIES)), help="comma list, 0 < d <= 1")
    x.add_argument("--max-tokens", type=int, default=128, help="new tokens per summary (paper: 128)")
    x.add_argument("--seed", type=int, default=0, help="request seed = seed + row (paper setting)")
    x.add_argument("--dtype", default="float32", help="engine dtype (float32: comparable with the HF oracle)")
    x.add_argument("--max-model-len", type=int, default=2048)
    x.add_argument("--chunk", type=int, default=64, help="requests per generate call (progress granularity)")
    x.add_argument("--out", default="eval_xsum.json", help="JSON path; .md and .png are written beside it")
    x.add_argument("--append", action="store_true", help="merge into an existing --out (same model/rows/settings)")
    x.add_argument("--no-plot", dest="plot", action="store_false")
    # A row's requests share its prompt: with prefix caching (exact under GRIFFIN: cached
    # blocks carry their statistic) each prompt is prefilled about once instead of per cell.
    x.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="share cached prompt blocks between a row's requests (default: on)")
    x.add_argument("--export-experts", default=None, help="also write every request's experts to this folder")
    x.set_defaults(func=_cli_xsum, record_command=True)
    from vllm_griffin import drift

    drift.add_parser(tasks)


def _cli_xsum(args) -> int:
    if args.limit is not None and args.limit < 1:
        print(f"error: --limit {args.limit} is invalid; allowed: a positive number of rows", file=sys.stderr)
        return 2
    if args.max_tokens < 1:
        print(f"error: --max-tokens {args.max_tokens} is invalid; allowed: >= 1", file=sys.stderr)
        return 2
    try:
        run_xsum(args)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
