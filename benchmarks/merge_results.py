"""Merge one evaluation results file into another of the same task, model and data:

    python benchmarks/merge_results.py FROM.json INTO.json

FROM's cells replace INTO's cells of the same (setting,) method, density and options, its
runs are recorded beside INTO's, and INTO's summary, markdown and PNG are written again
(scores against dense are recomputed over the merged samples). For runs that went to a
file of their own because another run was appending to INTO at the same time
(``benchmarks/quality_selection.sh default-guard``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_griffin.tools import eval_chat, eval_humaneval, eval_xsum  # noqa: E402
from vllm_griffin.tools.eval_common import merge_samples  # noqa: E402

# Fields besides the model that must agree, per task (XSum files carry no "task").
SAME = {"humaneval": ("problems", "max_tokens", "dtype"), "chat": ("prompts", "max_tokens", "dtype"),
        "xsum": ("data", "rows", "max_tokens", "dtype")}
MODULES = {"humaneval": (eval_humaneval, ()), "chat": (eval_chat, ()), "xsum": (eval_xsum, ("setting",))}


def merge(source: Path, target: Path) -> dict:
    new, into = json.loads(source.read_text()), json.loads(target.read_text())
    task = into.get("task", "xsum")
    if new.get("task", "xsum") != task:
        raise SystemExit(f"{source} holds task {new.get('task', 'xsum')!r}, {target} holds {task!r}")
    for key in ("model", *SAME[task]):
        if new.get(key) != into.get(key):
            raise SystemExit(f"{key} differs: {new.get(key)!r} in {source}, {into.get(key)!r} in {target}")
    module, fields = MODULES[task]
    *runs, last = new["runs"]
    into["runs"].extend(runs)
    merge_samples(into, new["samples"], last, fields)
    into["summary"] = module.summarize(into["samples"])
    module.write_outputs(into, target)
    return into


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    merge(args.source, args.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
