"""``vllm-griffin`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the rest is mostly `vllm serve`'s options: serving parses it
        from vllm_griffin.tools.serve import cli_serve

        return cli_serve(argv[1:])
    parser = argparse.ArgumentParser(prog="vllm-griffin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-model", help="build an embedded model's HF folder and print its path")
    from vllm_griffin.tools.models import MODELS

    prep.add_argument("name", choices=sorted(MODELS))
    from vllm_griffin.tools import bench

    bench.add_parser(sub)
    from vllm_griffin.tools import eval_xsum as quality_eval

    quality_eval.add_parser(sub)
    from vllm_griffin.tools import plots

    plots.add_parser(sub)
    from vllm_griffin.tools import serve

    serve.add_parser(sub)
    from vllm_griffin.tools import soak

    soak.add_parser(sub)
    args = parser.parse_args(argv)
    if hasattr(args, "func"):
        return args.func(args)
    if args.command == "prepare-model":
        from vllm_griffin.tools.models import cli_prepare_model

        return cli_prepare_model(args.name)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
