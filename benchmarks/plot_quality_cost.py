"""Quality against decode speed, one point per (method, density): the trade-off in one picture.

    python benchmarks/plot_quality_cost.py [--batch 1]

Quality: HumanEval pass@1 on Qwen2.5-Coder-0.5B as a share of dense (tuning and held-out
splits; benchmarks/quality_selection.sh). Speed: GRIFFIN/dense decode tokens/s of the same
model at that batch size, from ``vllm-griffin bench --models qwen-coder ... --methods ...``
(benchmarks/results/cpu_bench_methods.json). Writes benchmarks/results/quality/quality_vs_speed.png
and prints the points.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUALITY = HERE / "results" / "quality"
BENCH = HERE / "results" / "cpu_bench_methods.json"
QWEN = "qwen2.5-coder-0.5b-instruct"


def bench_label(method: str, options: dict) -> str:
    return method + (f"+refresh{options['refresh']}" if options.get("refresh") else "")


def points(batch: int) -> list[dict]:
    speed = {(r["method"], r["density"]): r["vs_dense"] for r in json.loads(BENCH.read_text())["summary"]
             if r["model"] == "qwen-coder" and r["batch"] == batch}
    out = []
    for split in ("tune", "heldout"):
        summary = json.loads((QUALITY / f"humaneval_{split}_{QWEN}.json").read_text())["summary"]
        for e in summary:
            if e["method"] == "full":
                continue
            key = (bench_label(e["method"], e.get("options") or {}), e["density"])
            if key in speed:
                out.append({"split": split, "label": f"{key[0]} @ {key[1]:g}", "speed": speed[key],
                            "kept": e["pass_at_1_retained"]})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    pts = points(args.batch)
    for p in pts:
        print(f"{p['split']:8} {p['label']:24} speed {p['speed']:.2f}x dense, pass@1 {100 * p['kept']:.0f} % of dense")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for split, marker in (("tune", "o"), ("heldout", "s")):
        mine = [p for p in pts if p["split"] == split]
        ax.scatter([p["speed"] for p in mine], [100 * p["kept"] for p in mine], marker=marker,
                   label={"tune": "HumanEval 0-81 (tuning)", "heldout": "HumanEval 82-163 (held out)"}[split])
        for p in mine:
            ax.annotate(p["label"], (p["speed"], 100 * p["kept"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.scatter([1.0], [100], marker="*", s=120, color="black", label="dense")
    ax.axhline(90, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"decode speed over dense (batch {args.batch}, one CPU core)")
    ax.set_ylabel("pass@1, % of dense")
    ax.set_title("Qwen2.5-Coder-0.5B: quality vs speed per method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = QUALITY / "quality_vs_speed.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
