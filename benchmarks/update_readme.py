"""Paste the result tables into README.md and docs/ between their markers, from the files in
benchmarks/results/. Pure Python: no engine, no GPU, seconds.

    python benchmarks/update_readme.py

README.md
  <!-- bench:headline --> ... <!-- /bench:headline -->      GRIFFIN/dense at density 0.5 per batch size:
                                                            results/cpu_bench.json, results/cpu_bench_methods.json
  <!-- quality:headline --> ... <!-- /quality:headline -->  a few rows of the quality table below
docs/speed.md
  <!-- bench:cpu --> ... <!-- /bench:cpu -->                results/cpu_bench.md (vllm-griffin bench)
  <!-- bench:methods --> ... <!-- /bench:methods -->        results/cpu_bench_methods.md (bench --methods)
  <!-- bench-trained:begin --> ... <!-- bench-trained:end -->   every results/bench_trained_*.json
  <!-- bench:h200 --> ... <!-- /bench:h200 -->              results/h200_triton_experts.json (gpu_kernels.py)
  <!-- gpu-model:begin --> ... <!-- gpu-model:end -->       every results/gpu_model*.json (gpu_model.py)
docs/quality.md
  <!-- quality:table --> ... <!-- /quality:table -->        results/quality/{humaneval,xsum_rows40-199,chat}_*.json
                                                            (benchmarks/quality_selection.sh)
  <!-- quality:screen --> ... <!-- /quality:screen -->      results/quality/screen_selection_*.json
  <!-- quality:screen-alloc --> ...                           results/quality/screen_alloc_*.json
docs/serving.md
  <!-- soak:begin --> ... <!-- soak:end -->                 results/soak_10min.json,
                                                            results/soak_10min_without_griffin.json

Each generated block carries the command that wrote its results file where the file
records its settings (bench, soak), so a number and its command travel together.
A results file not written yet (bench_trained_*, gpu_model*, the soaks) leaves a line
saying which command writes it; a marker missing from its page stops the script (the
page and this script disagree).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
QUALITY = RESULTS / "quality"
README = ROOT / "README.md"
DOCS = ROOT / "docs"

sys.path.insert(0, str(ROOT))  # run from anywhere: the package from this checkout


def _tool(name: str):
    """A pure-Python module of the package's tools, at its new path or its old one."""
    try:
        return importlib.import_module(f"vllm_griffin.tools.{name}")
    except ModuleNotFoundError:
        return importlib.import_module(f"vllm_griffin.{name}")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- commands, rebuilt from the settings a results file records -----------------------------

def _command(prefix: str, parser: argparse.ArgumentParser, settings: dict, out: Path,
             skip: tuple[str, ...] = (), always: tuple[str, ...] = ()) -> str:
    """``prefix`` plus every option whose recorded value differs from its default (and those in
    ``always``), and ``--out`` as the file's place in this repository (the run may have written
    it elsewhere)."""
    words = [prefix]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "out", *skip) or action.dest not in settings:
            continue
        value, default = settings[action.dest], action.default
        if value is None or value is False or action.dest not in always and (
                value == default or isinstance(default, Path) and value == str(default)):
            continue
        flag = action.option_strings[-1]
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            if value:
                words.append(f"{flag} {','.join(format(v, 'g') if isinstance(v, float) else str(v) for v in value)}")
        else:
            words.append(f"{flag} {format(value, 'g') if isinstance(value, float) else value}")
    words.append(f"--out {_rel(out)}")
    return " ".join(words)


def bench_command(path: Path) -> str:
    bench = _tool("bench")
    sub = argparse.ArgumentParser().add_subparsers()
    bench.add_parser(sub)
    return _command("vllm-griffin bench", sub.choices["bench"], json.loads(path.read_text()).get("settings", {}), path,
                    always=("models",))


def soak_command(path: Path) -> str:
    soak = _tool("soak")
    settings = json.loads(path.read_text()).get("settings", {})
    # bad_share is forced to 0 in a --without-griffin run; the flag is what was typed.
    parser = argparse.ArgumentParser()
    soak.add_arguments(parser)
    return _command("vllm-griffin soak", parser, settings, path,
                    skip=("bad_share",) if settings.get("without_griffin") else (), always=("minutes",))


# -- speed ------------------------------------------------------------------------------------

BENCH_MODELS = {"qwen-coder": "Qwen2.5-Coder-0.5B-Instruct", "smollm2": "SmolLM2-135M-Instruct",
                "gemma": "Gemma-3-270M", "llama-1b": "Llama 1B shape, random weights"}
# README's speed rows: (results file, model, method or "ceiling", label). Density 0.5.
HEADLINE_SPEED = (
    ("cpu_bench_methods.json", "qwen-coder", "gated+refresh4", "`gated` + refresh 4 (the default)"),
    ("cpu_bench_methods.json", "qwen-coder", "topk", "`topk` (the paper)"),
    ("cpu_bench.json", "llama-1b", "topk", "`topk` (the paper)"),
    ("cpu_bench.json", "llama-1b", "ceiling", "half-FF model, dense (the ceiling for 0.5)"),
    ("cpu_bench.json", "smollm2", "topk", "`topk` (the paper)"),
)


def speed_headline() -> str:
    cells, files = {}, []
    for name, model, method, _ in HEADLINE_SPEED:
        path = RESULTS / name
        if not path.exists():
            continue
        if path not in files:
            files.append(path)
        for r in json.loads(path.read_text())["summary"]:
            if r["model"] != model or r["density"] != 0.5:
                continue
            if method == "ceiling" and r.get("ceiling_vs_dense") is not None:
                cells[(model, method, r["batch"])] = r["ceiling_vs_dense"]
            elif r.get("method", "topk") == method:
                cells[(model, method, r["batch"])] = r["vs_dense"]
    batches = sorted({b for _, _, b in cells})
    lines = ["| model | method @ density 0.5 | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|---|" + "---|" * len(batches)]
    for _, model, method, label in HEADLINE_SPEED:
        row = [f"{cells[(model, method, b)]:.2f}" if (model, method, b) in cells else "-" for b in batches]
        if any(v != "-" for v in row):
            lines.append(f"| {BENCH_MODELS[model]} | {label} | " + " | ".join(row) + " |")
    commands = "\n".join(bench_command(p) for p in files)
    return "\n".join(lines) + f"\n\n```\n{commands}\n```"


METHOD_LABELS = {"gated+refresh4": "`gated` + refresh 4 (the default)", "topk": "`topk` (the paper)"}
TRAINED_BATCHES = (1, 4, 8)


def trained_headline() -> str:
    """README's speed table: every ``bench_trained_*.json`` (trained models, real prompts), then the
    random-weight 1B shape (``cpu_bench.json``) as the memory-bound reference; GRIFFIN/dense at
    density 0.5 per batch, and the batch's union of experts as a share of the neurons."""
    rows, files = [], []
    for path in sorted(RESULTS.glob("bench_trained_*.json")):
        files.append(path)
        summary = [r for r in json.loads(path.read_text())["summary"] if r["density"] == 0.5]
        for model in dict.fromkeys(r["model"] for r in summary):
            for method in METHOD_LABELS:
                cells = {r["batch"]: r for r in summary if r["model"] == model and r.get("method") == method}
                if not cells:
                    continue
                first = next(iter(cells.values()))
                what = f"{BENCH_MODELS[model]}, {first['prompts']} prompts"
                rows.append((what, METHOD_LABELS[method], cells))
    reference = RESULTS / "cpu_bench.json"
    if reference.exists():
        files.append(reference)
        summary = json.loads(reference.read_text())["summary"]
        cells = {r["batch"]: r for r in summary if r["model"] == "llama-1b" and r["density"] == 0.5}
        rows.append(("Llama 1B shape, random weights, random 32-token prompts", METHOD_LABELS["topk"], cells))
    cols = " | ".join(f"batch {b}" for b in TRAINED_BATCHES)
    lines = [f"| model, prompts | method @ density 0.5 | {cols} | union of experts, batch "
             + " / ".join(map(str, TRAINED_BATCHES)) + " |", "|---|---|" + "---|" * (len(TRAINED_BATCHES) + 1)]
    for what, label, cells in rows:
        ratios = [f"{cells[b]['vs_dense']:.2f}" if b in cells else "-" for b in TRAINED_BATCHES]
        unions = [f"{cells[b]['union_fraction']:.2f}" if cells.get(b, {}).get("union_fraction") is not None
                  else "-" for b in TRAINED_BATCHES]
        lines.append(f"| {what} | {label} | " + " | ".join(ratios) + " | " + " / ".join(unions) + " |")
    commands = "\n".join(bench_command(p) for p in files)
    return "\n".join(lines) + f"\n\n```\n{commands}\n```"


def bench_markdown(name: str) -> str:
    path = RESULTS / name
    return path.read_text().strip() + f"\n\n```\n{bench_command(path.with_suffix('.json'))}\n```"


def bench_trained() -> str:
    paths = sorted(RESULTS.glob("bench_trained_*.json"))
    if not paths:
        return ("No results yet: `vllm-griffin bench --prompts xsum|humaneval --models smollm2,gemma,qwen-coder "
                "--out benchmarks/results/bench_trained_NAME.json` writes them, and this script pastes every "
                "`bench_trained_*.json` here.")
    markdown = _tool("bench").markdown
    parts = []
    for path in paths:
        parts.append(f"`{_rel(path)}`:\n\n```\n{bench_command(path)}\n```\n\n"
                     + markdown(json.loads(path.read_text())["summary"]))
    return "\n\n".join(parts)


def h200_table() -> str:
    data = json.loads((RESULTS / "h200_triton_experts.json").read_text())
    lines = ["| rows | density | dense (cuBLAS) µs | GRIFFIN (Triton) µs | speed-up |", "|---|---|---|---|---|"]
    for t in data["timings"]:
        lines.append(f"| {t['rows']} | {t['density']} | {t['graph_dense_us']:.1f} | {t['graph_griffin_us']:.1f} | "
                     f"{t['graph_speedup']:.2f} |")
    return "\n".join(lines)


def gpu_model_tables() -> str:
    """benchmarks/gpu_model.py's own table (markdown_table there), per results file."""
    paths = sorted(RESULTS.glob("gpu_model*.json"))
    if not paths:
        return ("No GPU figures yet: no GPU has run `bash benchmarks/device_run.sh` since the script was written. "
                "Its `gpu_model.json` files go to `benchmarks/results/gpu_model*.json`, which this script pastes here.")
    parts = []
    for path in paths:
        data = json.loads(path.read_text())
        shape = data.get("shape", {})
        check = data.get("check")
        verdict = "skipped" if check is None else "passed" if check.get("passed") else "FAILED"
        head = (f"`{_rel(path)}`: {data.get('device')}, torch {data.get('torch')}, Triton {data.get('triton', '-')}, "
                f"{data.get('dtype')}, {shape.get('layers')} layers, hidden {shape.get('hidden')}, "
                f"FF {shape.get('ffn')}, path `{data.get('path')}`, CUDA graphs {data.get('graphs')}; "
                f"correctness check: {verdict}")
        lines = ["| batch | config | path | ms/step | tok/s | x dense | union / D |",
                 "|---:|---|---|---:|---:|---:|---:|"]
        for r in data.get("results", []):
            union = "" if r.get("union_fraction") is None else f"{r['union_fraction']:.2f}"
            if r.get("ms_per_step") is None:
                lines.append(f"| {r['batch']} | {r['config']} | {r['path']} | failed | | | {union} |")
            else:
                lines.append(f"| {r['batch']} | {r['config']} | {r['path']} | {r['ms_per_step']:.3f} | "
                             f"{r['tok_per_s']:.1f} | {r['speedup_vs_dense']:.2f} | {union} |")
        parts.append(head + "\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


# -- quality ------------------------------------------------------------------------------

QWEN = "qwen2.5-coder-0.5b-instruct"
CHAT_MODELS = ("smollm2-135m-instruct", "gemma-3-270m", QWEN)
XSUM_MODELS = ("smollm2-135m-instruct", "gemma-3-270m")
DEFAULT_CELL = ("gated", 0.5, json.dumps({"refresh": 4}))


def _cells(path: Path) -> dict[tuple, dict]:
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())["summary"]
    return {(e["method"], e["density"], json.dumps(e.get("options") or {}, sort_keys=True)): e for e in summary}


def _label(method: str, density: float, options: str) -> str:
    if density == 1.0:
        return "dense"
    refresh, guard = json.loads(options).get("refresh"), json.loads(options).get("loop_guard")
    # The evaluations send refresh 0 and no loop guard unless asked, so a plain `gated` cell ran
    # without its defaults.
    text = method + (f" + refresh {refresh}" if refresh else ", no refresh" if method == "gated" else "")
    text += f" + loop guard {guard}" if guard else ""
    return text + f" @ {density:g}" + (" (default)" if (method, density, options) == DEFAULT_CELL else "")


def quality_table(only: tuple[tuple, ...] | None = None) -> str:
    """One row per (method, density, options) measured on HumanEval: pass@1 on the tuning
    and held-out problems, XSum ROUGE-L kept on rows 40-199, chat answers that loop."""
    tune = _cells(QUALITY / f"humaneval_tune_{QWEN}.json")
    held = _cells(QUALITY / f"humaneval_heldout_{QWEN}.json")
    xsum = {m: _cells(QUALITY / f"xsum_rows40-199_{m}.json") for m in XSUM_MODELS}
    chat = {m: _cells(QUALITY / f"chat_{m}.json") for m in CHAT_MODELS}
    head = ("| method @ density | HumanEval 0-81 (tuning) | HumanEval 82-163 (held out) | "
            "XSum ROUGE-L kept, SmolLM2 | XSum ROUGE-L kept, Gemma-3 | chat: looping answers of 48 "
            "(SmolLM2 / Gemma-3 / Qwen-Coder) |")
    lines = [head, "|---|---|---|---|---|---|"]

    def he(cells, key):
        e = cells.get(key)
        return f"{e['solved']}/{e['n']} ({100 * e['pass_at_1_retained']:.0f} %)" if e else "-"

    def kept(cells, key):
        e = cells.get(key)
        return f"{100 * e['rougeL_retained']:.0f} %" if e and e.get("rougeL_retained") is not None else "-"

    def loops(key):
        return " / ".join(str(chat[m][key]["degenerate"]) if key in chat[m] else "-" for m in CHAT_MODELS)

    if only is None:
        keys = sorted(set(tune) | set(held), key=lambda k: (k[1] == 1.0, k[1], k[0] != "topk", k[0], k[2]))
    else:
        keys = [k for k in only if k in tune or k in held]
    for key in keys:
        lines.append(f"| {_label(*key)} | {he(tune, key)} | {he(held, key)} | {kept(xsum[XSUM_MODELS[0]], key)} | "
                     f"{kept(xsum[XSUM_MODELS[1]], key)} | {loops(key)} |")
    return "\n".join(lines)


SCREEN = QUALITY / f"screen_selection_{QWEN}.json"
# What each screened candidate costs per decode token, as a share of the dense MLP (see screen_selection.py).
SCREEN_COST = {"topk": "0.5", "topk@0.75": "0.75", "topk_magnitude": "0.5", "token_oracle": "(needs all of z)",
               "refresh4": "0.625", "refresh4_decay0.5": "0.625", "refresh16": "0.53", "refresh16_decay0.5": "0.53"}


# Session 10's screen of per-layer budgets (same problems and tokens; its topk and gated rows
# re-measured beside them on this machine).
SCREEN_ALLOC = QUALITY / f"screen_alloc_{QWEN}.json"


def screen_table(path: Path = SCREEN) -> str:
    data = json.loads(path.read_text())
    lines = ["| candidate | cost (share of the MLP) | top-1 agreement with dense | mean KL(dense ‖ candidate) |",
             "|---|---|---|---|"]
    for name, (agree, kl) in data["mean"].items():
        cost = SCREEN_COST.get(name)
        if cost is None and name.startswith("gate_p"):
            pool, k = (float(v) for v in name[len("gate_p"):].split("_k"))
            cost = f"{(pool + 2 * k) / 3:.3g}"
        elif cost is None and name.startswith("svd"):
            cost = "0.5 + predictor"
        elif cost is None and name.startswith(("alloc", "gated_dense_")):
            cost = "0.5"
        lines.append(f"| {name} | {cost} | {agree:.3f} | {kl:.3f} |")
    return "\n".join(lines)


# -- soak -------------------------------------------------------------------------------------

SOAKS = (("with GRIFFIN", RESULTS / "soak_10min.json"),
         ("without GRIFFIN (control)", RESULTS / "soak_10min_without_griffin.json"))


def soak_table() -> str:
    runs = [(label, path, json.loads(path.read_text())) for label, path in SOAKS if path.exists()]
    if not runs:
        return "No results yet: `vllm-griffin soak --minutes 10 --out benchmarks/results/soak_10min.json`."

    def alone(r):
        checks = r.get("alone_checks", [])
        same = sum(a["same"] or bool(a.get("selection_near_tie")) for a in checks)
        ties = sum(bool(a.get("selection_near_tie")) for a in checks)
        return f"{same} / {len(checks)}" + (f" ({ties} after a near-tie in the selection)" if ties else "")

    def rss(r):
        m = r["rss_mib"]
        return f"{m['first']:.0f} → {m['last']:.0f}"

    rows = (
        ("verdict", lambda r: "passed" if r["passed"] else "failed"),
        ("requests completed", lambda r: r["requests"]["completed"]),
        ("closed mid-stream", lambda r: r["requests"]["aborted_mid_stream"]),
        ("bad options rejected with HTTP 400", lambda r: r["requests"]["rejected_400_as_intended"]),
        ("errors", lambda r: r["requests"]["errors"]),
        ("preemptions", lambda r: f"{r['preemptions']:.0f}"),
        ("RSS first → last sample, MiB", rss),
        ("RSS growth over the second half", lambda r: f"{100 * r['rss_mib']['second_half_growth']:+.1f} %"),
        ("generated tok/s (mean of samples)", lambda r: r["mean_tokens_per_s"]),
        ("greedy answers the same alone", alone),
        ("slots / accumulators / requests held when idle",
         lambda r: " / ".join(f"{v:.0f}" for v in r["idle"].values()) if r.get("idle") else "-"),
    )
    lines = ["| | " + " | ".join(label for label, _, _ in runs) + " |", "|---|" + "---|" * len(runs)]
    for name, cell in rows:
        lines.append(f"| {name} | " + " | ".join(str(cell(r)) for _, _, r in runs) + " |")
    commands = "\n".join(soak_command(path) for _, path, _ in runs)
    findings = [f"- {label}: {finding}" for label, _, r in runs for finding in _findings(r)]
    return "\n".join(lines) + f"\n\n```\n{commands}\n```" + (
        "\n\nFindings:\n\n" + "\n".join(findings) if findings else "")


def _findings(report: dict) -> list[str]:
    """The run's findings, with each greedy answer that parted from its alone run in words
    (soak.py writes those as one line holding the checks' dicts)."""
    out = [f for f in report["findings"] if "answered differently alone" not in f]
    for a in report.get("alone_checks", []):
        if a["same"] or a.get("selection_near_tie"):
            continue
        opts = a.get("options") or {}
        what = ", ".join(f"{k.removeprefix('griffin_')} {v}" for k, v in opts.items()) or "the engine's options"
        margins = a.get("margins_where_parted")
        out.append(f"a greedy {'chat' if a.get('chat') else 'completion'} answer ({what}; {a['tokens']} tokens) "
                   f"parted from its alone run at token {a['parted_at']}"
                   + (f", top-2 log-prob margins there {margins[0]:.2f} (batched) and {margins[1]:.2f} (alone)"
                      if margins else ""))
    return out


# -- pasting --------------------------------------------------------------------------------

def _pattern(name: str) -> re.Pattern:
    """``<!-- name -->`` ... ``<!-- /name -->``, or ``<!-- name:begin -->`` ... ``<!-- name:end -->``."""
    if name.endswith(":begin"):
        base = name[: -len(":begin")]
        return re.compile(rf"(<!-- {re.escape(name)} -->\n)(?:.*?\n)?(<!-- {re.escape(base)}:end -->)", re.S)
    return re.compile(rf"(<!-- {re.escape(name)} -->\n)(?:.*?\n)?(<!-- /{re.escape(name)} -->)", re.S)


def fill(path: Path, tables: dict[str, str]) -> None:
    text = path.read_text()
    for name, table in tables.items():
        pattern = _pattern(name)
        if not pattern.search(text):
            raise SystemExit(f"{_rel(path)} has no <!-- {name} --> marker pair")
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
    path.write_text(text)


def main() -> None:
    fill(README, {"bench:trained": trained_headline(), "quality:headline": quality_table()})
    fill(DOCS / "speed.md", {"bench:headline": speed_headline()})
    fill(DOCS / "speed.md", {"bench:cpu": bench_markdown("cpu_bench.md"),
                             "bench:methods": bench_markdown("cpu_bench_methods.md"),
                             "bench-trained:begin": bench_trained(), "bench:h200": h200_table(),
                             "gpu-model:begin": gpu_model_tables()})
    fill(DOCS / "quality.md", {"quality:table": quality_table(),
                               **({"quality:screen": screen_table()} if SCREEN.exists() else {}),
                               **({"quality:screen-alloc": screen_table(SCREEN_ALLOC)} if SCREEN_ALLOC.exists()
                                  else {})})
    fill(DOCS / "serving.md", {"soak:begin": soak_table()})


if __name__ == "__main__":
    main()
