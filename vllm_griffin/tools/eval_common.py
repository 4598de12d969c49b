"""What every quality eval command shares (``vllm-griffin eval xsum|humaneval|chat``).

The sweep machinery: cells (method x density, dense as the method ``full``),
per-request options, one engine run in chunks with a progress bar, ``--append``
merging, the output files (JSON, markdown, PNG) and the common command-line
options. The commands (:mod:`vllm_griffin.tools.eval_xsum`,
:mod:`vllm_griffin.tools.eval_humaneval`, :mod:`vllm_griffin.tools.eval_chat`)
differ only in their prompts and scores. Also the XSum data helpers that the
bench and the drift study read rows with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_griffin.core.algorithm import METHODS

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
    repo = Path(__file__).resolve().parents[2]
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
            raise EvalError(f"--data {str(path)!r} is not a file; give a JSONL with 'article' and 'summary_gt' "
                            "per line")
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


def plan_cells(methods: list[str], densities: list[float]) -> list[tuple[str, float]]:
    """The (method, density) cells of a sweep; ``full`` and density 1.0 both mean dense, asked once."""
    cells: list[tuple[str, float]] = []
    if FULL in methods or 1.0 in densities:
        cells.append((FULL, 1.0))
    return cells + [(m, d) for m in methods if m != FULL for d in densities if d < 1.0]


def plan_jobs(rows: list, settings: list[str], methods: list[str], densities: list[float]) -> list[Job]:
    """Every (setting, method, density, row), dense once per row and setting.

    A row's requests are adjacent, so with ``--prefix-caching`` its later requests
    find the prompt's KV blocks (and their statistic rows) still cached."""
    cells = plan_cells(methods, densities)
    return [Job(setting, m, d, r) for r in range(len(rows)) for setting in settings for m, d in cells]


def parse_request_options(text: str | None) -> dict[str, Any]:
    """``--request-options JSON``: extra keys for every non-dense request's ``extra_args["griffin"]``.

    Checked here with the engine's own parser (:func:`vllm_griffin.core.config.parse_request_options`),
    so a key the plugin does not know fails before an engine starts, and keys the
    plugin learns later work here without a change."""
    if text is None:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EvalError(f"--request-options {text!r} is not JSON ({exc.msg}); allowed: a JSON object "
                        "such as '{\"key\": value}'") from None
    if not isinstance(options, dict):
        raise EvalError(f"--request-options {text!r} is invalid; allowed: a JSON object such as '{{\"key\": value}}'")
    for key in ("density", "method"):
        if key in options:
            raise EvalError(f"--request-options key {key!r} is invalid; allowed: keys other than density and "
                            "method (--methods and --densities set those)")
    from vllm_griffin.core.config import GriffinConfigError
    from vllm_griffin.core.config import parse_request_options as check

    try:
        check({"griffin": {**options, "density": 0.5, "method": "topk"}})
    except GriffinConfigError as exc:
        raise EvalError(f"--request-options: {exc}") from None
    return options


def griffin_extra(method: str, density: float, options: dict | None = None) -> dict:
    """A request's ``extra_args``: ``full`` is density 1.0 (vLLM's own MLP) and takes no options."""
    if method == FULL:
        return {"griffin": {"density": 1.0, "method": "topk"}}
    # No refresh and no loop guard unless the options say otherwise: a cell is what its label
    # says, whatever the engine's defaults for the method (algorithm.DEFAULT_REFRESH, DEFAULT_LOOP_GUARD).
    return {"griffin": {"refresh": 0, "loop_guard": 0, **(options or {}), "density": density, "method": method}}


def options_label(options: dict | None) -> str:
    """A cell's request options as compact JSON ("" for none): part of its key in merges and summaries."""
    return json.dumps(options, sort_keys=True, separators=(",", ":")) if options else ""


def cell_key(sample: dict, fields: tuple[str, ...] = ()) -> tuple:
    """What makes two samples the same cell: ``fields`` (e.g. the setting), method, density, options."""
    return tuple(sample[f] for f in fields) + (sample["method"], sample["density"],
                                               options_label(sample.get("options")))


def group_cells(samples: list[dict], fields: tuple[str, ...] = ()) -> list[tuple[tuple, list[dict]]]:
    """Samples per cell, sorted by ``fields``, then density (dense last), method and options."""
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        groups.setdefault(cell_key(s, fields), []).append(s)
    n = len(fields)
    return sorted(groups.items(), key=lambda kv: (kv[0][:n], kv[0][n + 1], kv[0][n], kv[0][n + 2]))


def sampling_params(job: Job, max_tokens: int, seed: int | None, *, stop: Iterable[str] = (STOP,),
                    options: dict | None = None):
    from vllm import SamplingParams

    # The same seed for a row in every cell: differences come from the experts, not the dice.
    # Greedy requests carry it too: GRIFFIN's random/sampling methods draw from it.
    request_seed = None if seed is None else seed + job.row
    return SamplingParams(max_tokens=max_tokens, stop=list(stop), seed=request_seed,
                          extra_args=griffin_extra(job.method, job.density, options), **SETTINGS[job.setting])


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
        raise SystemExit("rouge-score is not installed: pip install 'vllm-griffin[eval]' (or `make setup`)") from None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    return [{k: 100.0 * v.fmeasure for k, v in scorer.score(ref, pred).items()}
            for pred, ref in zip(predictions, references)]


def agreement_with_dense(samples: list[dict], fields: tuple[str, ...] = ("setting", "row"),
                         text: str = "prediction") -> None:
    """Set each sample's ``rougeL_vs_full``: ROUGE-L of its ``text`` against the dense
    output for the same ``fields`` (xsum: row and setting). With a small model the
    reference summaries match loosely and the mean over a few rows is noisy;
    closeness to dense is the more direct measure of what GRIFFIN changed."""
    dense = {tuple(s[f] for f in fields): s[text] for s in samples if s["method"] == FULL}
    todo = [(s, dense[key]) for s in samples if (key := tuple(s[f] for f in fields)) in dense]
    scores = rouge_scores([s[text] for s, _ in todo], [ref for _, ref in todo])
    for (s, ref), score in zip(todo, scores):
        # Two empty outputs agree fully; rouge-score would say 0.
        s["rougeL_vs_full"] = 100.0 if s[text].strip() == ref.strip() else score["rougeL"]


def summarize(samples: list[dict]) -> list[dict]:
    """Mean ROUGE per (setting, method, density, options), sorted."""
    agreement_with_dense(samples)
    table = []
    for (setting, method, density, _), items in group_cells(samples, ("setting",)):
        entry = {"setting": setting, "method": method, "density": density, "options": items[0].get("options") or {},
                 "rows": len(items)}
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
    from vllm_griffin.tools.models import MODELS, prepare_model

    if name_or_path in MODELS:
        return prepare_model(name_or_path)
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    raise EvalError(f"--model {name_or_path!r} is invalid; allowed: {', '.join(sorted(MODELS))} "
                    "or a Hugging Face model folder (with config.json)")


class Engine:
    """One vLLM engine with GRIFFIN switched on for a whole sweep (every eval command).

    The engine-wide density is only a default: every request names its own method
    and density. A context manager, so the engine core also stops when an input
    check fails after the start."""

    def __init__(self, model_path: Path, args: argparse.Namespace):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        started = time.perf_counter()
        self.llm = LLM(model=str(model_path), dtype=args.dtype, enforce_eager=True, gpu_memory_utilization=0.5,
                       max_model_len=args.max_model_len, seed=args.seed, enable_prefix_caching=args.prefix_caching,
                       additional_config={"griffin": {"density": 0.5}})
        self.start_s = time.perf_counter() - started
        self.generate_s = 0.0
        self.tokenizer = self.llm.get_tokenizer()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def check_lengths(self, prompts: list, labels: list, max_tokens: int, max_model_len: int, what: str) -> None:
        """Fail before generating when a prompt plus ``max_tokens`` does not fit the context."""
        too_long = [label for label, p in zip(labels, prompts)
                    if len(p["prompt_token_ids"] if isinstance(p, dict) else self.tokenizer(p).input_ids)
                    + max_tokens > max_model_len]
        if too_long:
            raise EvalError(f"{what} {too_long[:5]} need more than --max-model-len {max_model_len} tokens "
                            f"with --max-tokens {max_tokens}; allowed: a larger --max-model-len or fewer tokens")

    def generate(self, prompts: list, params: list, chunk: int, desc: str) -> list:
        """All requests in ``llm.generate`` calls of ``chunk``, with a progress bar on stderr."""
        from tqdm import tqdm

        started = time.perf_counter()
        outputs: list = []
        with tqdm(total=len(prompts), desc=desc, unit="req", file=sys.stderr) as bar:
            for i in range(0, len(prompts), chunk):
                outputs += self.llm.generate(prompts[i: i + chunk], params[i: i + chunk], use_tqdm=False)
                bar.update(len(prompts[i: i + chunk]))
        self.generate_s += time.perf_counter() - started
        return outputs


def run_info(args: argparse.Namespace, engine: Engine, requests: int, options: dict, **fields) -> dict:
    """One run's record in the JSON's ``runs``: what it swept, its wall times and its command."""
    return {**fields, "request_options": options or None,
            "engine_start_s": round(engine.start_s, 1), "generate_s": round(engine.generate_s, 1),
            "requests": requests,
            "command": "vllm-griffin " + " ".join(sys.argv[1:]) if getattr(args, "record_command", True) else None}


def load_previous(out: Path, identity: dict[str, Any]) -> dict | None:
    """``--append``: the existing result at ``out``, which must match ``identity`` (model, rows, ...)."""
    if not out.is_file():
        return None
    previous = json.loads(out.read_text())
    for key, value in identity.items():
        if previous.get(key) != value:
            raise EvalError(f"--append: {out} has {key}={previous.get(key)!r}, this run has {value!r}; "
                            "use another --out or the same settings")
    return previous


def merge_samples(result: dict, samples: list[dict], run: dict, fields: tuple[str, ...] = ()) -> dict:
    """Put a run's samples into ``result``, replacing the cells it ran again, and record the run."""
    keys = {cell_key(s, fields) for s in samples}
    result["samples"] = [s for s in result["samples"] if cell_key(s, fields) not in keys] + samples
    result["runs"].append(run)
    return result


def record_run(result: dict, samples: list[dict], run: dict, summarize: Callable[[list[dict]], list[dict]],
               fields: tuple[str, ...] = ()) -> dict:
    """Every eval's last step before writing: merge the run's samples into ``result`` and
    summarize all of its cells again."""
    merge_samples(result, samples, run, fields)
    result["summary"] = summarize(result["samples"])
    return result



# -- outputs ---------------------------------------------------------------------------


def method_label(entry: dict) -> str:
    """How tables and plots name a cell: its method, with its request options when it has some."""
    label = options_label(entry.get("options"))
    return f"{entry['method']} {label}" if label else entry["method"]


def method_order(labels: Iterable[str]) -> list[str]:
    """Method labels in ``EVAL_METHODS`` order (unknown methods last), each method's variants together."""
    def rank(label: str) -> tuple:
        method = label.split(" ")[0]
        return (EVAL_METHODS.index(method) if method in EVAL_METHODS else len(EVAL_METHODS), label)

    return sorted(set(labels), key=rank)


def write_result(result: dict, out: Path, markdown: str, plotter: Callable[[dict, Path], Any] | None) -> None:
    """Every eval command's files: the JSON, the markdown beside it, the PNG when ``plotter``; the
    markdown is printed too."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
    if plotter is not None:
        plotter(result, out.with_suffix(".png"))
    print(markdown)
    print(f"wrote {out}, {out.with_suffix('.md')}" + (f", {out.with_suffix('.png')}" if plotter else ""))



# -- command line ----------------------------------------------------------------------


def add_sweep_arguments(p: argparse.ArgumentParser, *, unit: str, max_tokens: int, out: str,
                        methods: Iterable[str] = DEFAULT_METHODS,
                        densities: Iterable[float] = DEFAULT_DENSITIES) -> None:
    """The options every engine-backed eval command shares (model, rows, cells, engine, outputs)."""
    from vllm_griffin.tools.models import MODELS

    one = unit[:-1]  # "rows" -> "row"
    p.add_argument("--model", required=True, help=f"embedded model name ({', '.join(sorted(MODELS))}) or HF folder")
    p.add_argument("--limit", type=int, default=None, help=f"{unit} to evaluate (default: all)")
    p.add_argument("--start", type=int, default=0, help=f"first of the {unit} (0-based)")
    p.add_argument("--methods", default=",".join(methods), help="comma list of: " + ", ".join(EVAL_METHODS))
    p.add_argument("--densities", default=",".join(map(str, densities)), help="comma list, 0 < d <= 1")
    p.add_argument("--request-options", default=None, metavar="JSON",
                   help="JSON object merged into every non-dense request's extra_args['griffin'] "
                        "(recorded in the JSON; default: none)")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"new tokens per request (default {max_tokens})")
    p.add_argument("--seed", type=int, default=0, help=f"engine seed; request seed = seed + {one} index")
    p.add_argument("--dtype", default="float32", help="engine dtype (float32: comparable with the HF oracle)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=64, help="requests per generate call (progress granularity)")
    p.add_argument("--out", default=out, help="JSON path; .md and .png are written beside it")
    p.add_argument("--append", action="store_true", help=f"merge into an existing --out (same model/{unit}/settings)")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    # A row's requests share its prompt: with prefix caching (exact under GRIFFIN: cached
    # blocks carry their statistic) each prompt is prefilled about once instead of per cell.
    p.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help=f"share cached prompt blocks between the requests of a {one} (default: on)")


def cli_runner(run: Callable[[argparse.Namespace], dict]) -> Callable[[argparse.Namespace], int]:
    """An eval command's CLI body: bad counts and :class:`EvalError` print the message and give exit 2."""
    def cli(args: argparse.Namespace) -> int:
        for name, value, allowed in (("--limit", args.limit, "a positive number"),
                                     ("--max-tokens", args.max_tokens, ">= 1"),
                                     ("--chunk", args.chunk, ">= 1")):
            if value is not None and value < 1:
                print(f"error: {name} {value} is invalid; allowed: {allowed}", file=sys.stderr)
                return 2
        try:
            run(args)
        except EvalError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0

    return cli
