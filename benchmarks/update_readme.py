"""Paste benchmark tables into README.md between their markers.

    python benchmarks/update_readme.py

<!-- bench:cpu --> ... <!-- /bench:cpu -->     results/cpu_bench.md (vllm-griffin bench)
<!-- bench:h200 --> ... <!-- /bench:h200 -->   results/h200_triton_experts.json (gpu_kernels.py)
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


def main() -> None:
    text = README.read_text()
    tables = {"cpu": (HERE / "results" / "cpu_bench.md").read_text().strip(), "h200": h200_table()}
    for name, table in tables.items():
        pattern = re.compile(rf"(<!-- bench:{name} -->\n)(?:.*?\n)?(<!-- /bench:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- bench:{name} --> markers")
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
    README.write_text(text)


if __name__ == "__main__":
    main()
