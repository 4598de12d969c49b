"""Paste benchmark tables into README.md between their markers.

    python benchmarks/update_readme.py

<!-- bench:cpu --> ... <!-- /bench:cpu -->     results/cpu_bench.md (vllm-griffin bench)
<!-- bench:h200 --> ... <!-- /bench:h200 -->   results/h200_triton_experts.json (gpu_kernels.py)
<!-- quality:headline --> ... <!-- /quality:headline -->   results/quality/{humaneval,xsum_rows40-199,chat}_*.json
                                                  (benchmarks/quality_selection.sh)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"


def h200_table() -> str:
    data = json.loads((HERE / "results" / "h200_triton_experts.json").read_text())
    lines = ["| rows | density | dense (cuBLAS) µs | GRIFFIN (Triton) µs | speed-up |", "|---|---|---|---|---|"]
    for t in data["timings"]:
        lines.append(f"| {t['rows']} | {t['density']} | {t['graph_dense_us']:.1f} | {t['graph_griffin_us']:.1f} | "
                     f"{t['graph_speedup']:.2f} |")
    return "\n".join(lines)


QUALITY = HERE / "results" / "quality"
QWEN = "qwen2.5-coder-0.5b-instruct"
CHAT_MODELS = ("smollm2-135m-instruct", "gemma-3-270m", QWEN)
XSUM_MODELS = ("smollm2-135m-instruct", "gemma-3-270m")


def _cells(path: Path) -> dict[tuple, dict]:
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())["summary"]
    return {(e["method"], e["density"], json.dumps(e.get("options") or {}, sort_keys=True)): e for e in summary}


def _label(method: str, density: float, options: str) -> str:
    opts = json.loads(options)
    return method + (f" + refresh {opts['refresh']}" if opts.get("refresh") else "") + f" @ {density:g}"


def quality_table() -> str:
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

    keys = sorted(set(tune) | set(held), key=lambda k: (k[1] == 1.0, k[1], k[0] != "topk", k[0], k[2]))
    for key in keys:
        label = "dense" if key[1] == 1.0 else _label(*key)
        lines.append(f"| {label} | {he(tune, key)} | {he(held, key)} | {kept(xsum[XSUM_MODELS[0]], key)} | "
                     f"{kept(xsum[XSUM_MODELS[1]], key)} | {loops(key)} |")
    return "\n".join(lines)


SCREEN = QUALITY / f"screen_selection_{QWEN}.json"
# What each screened candidate costs per decode token, as a share of the dense MLP (see screen_selection.py).
SCREEN_COST = {"topk": "0.5", "topk@0.75": "0.75", "topk_magnitude": "0.5", "token_oracle": "(needs all of z)",
               "refresh4": "0.625", "refresh4_decay0.5": "0.625", "refresh16": "0.53", "refresh16_decay0.5": "0.53"}


def screen_table() -> str:
    data = json.loads(SCREEN.read_text())
    lines = ["| candidate | cost (share of the MLP) | top-1 agreement with dense | mean KL(dense ‖ candidate) |",
             "|---|---|---|---|"]
    for name, (agree, kl) in data["mean"].items():
        cost = SCREEN_COST.get(name)
        if cost is None and name.startswith("gate_p"):
            pool, k = (float(v) for v in name[len("gate_p"):].split("_k"))
            cost = f"{(pool + 2 * k) / 3:.3g}"
        elif cost is None and name.startswith("svd"):
            cost = "0.5 + predictor"
        lines.append(f"| {name} | {cost} | {agree:.3f} | {kl:.3f} |")
    return "\n".join(lines)


def fill(path: Path, tables: dict[str, str]) -> None:
    text = path.read_text()
    for name, table in tables.items():
        pattern = re.compile(rf"(<!-- {name} -->\n)(?:.*?\n)?(<!-- /{name} -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
    path.write_text(text)


def main() -> None:
    quality = quality_table()
    fill(HERE.parent / "docs" / "quality.md", {"quality:headline": quality,
                                               **({"quality:screen": screen_table()} if SCREEN.exists() else {})})
    text = README.read_text()
    tables = {"bench:cpu": (HERE / "results" / "cpu_bench.md").read_text().strip(), "bench:h200": h200_table(),
              "quality:headline": quality}
    for name, table in tables.items():
        pattern = re.compile(rf"(<!-- {name} -->\n)(?:.*?\n)?(<!-- /{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- {name} --> markers")
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
    README.write_text(text)


if __name__ == "__main__":
    main()
