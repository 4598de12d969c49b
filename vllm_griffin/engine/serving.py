"""GRIFFIN on the OpenAI-compatible server: ``vllm serve <model> --plugin griffin``.

vLLM has no ``--plugin`` flag, but it loads general plugins (``register()``)
right before ``vllm serve`` builds its argument parser, and says there that a
plugin may extend the parser. :func:`install_cli_hooks` uses exactly that:

* ``EngineArgs.add_cli_args`` also adds a "GRIFFIN" group with ``--plugin griffin``,
  ``--griffin-density D`` and ``--griffin-method M`` (values checked while parsing);
* ``EngineArgs.from_cli_args`` folds those flags into ``additional_config["griffin"]``,
  so from there on the server is configured exactly as with
  ``--additional-config '{"griffin": {...}}'``.

Without ``--plugin griffin`` (and without a ``griffin`` additional config) both
hooks pass everything through and the server is plain vLLM.

``vllm-griffin serve`` (:func:`cli_serve`) starts the same server on an
embedded model for a quick try.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Mapping
from typing import Any

from vllm_griffin.core.algorithm import METHODS
from vllm_griffin.core.config import (
    CONFIG_KEY,
    GriffinConfig,
    GriffinConfigError,
    RequestOptions,
    check_density,
    check_method,
    parse_request_options,
)

logger = logging.getLogger("vllm.griffin.serving")

PLUGIN_NAME = "griffin"
# Namespace attributes of the flags; prefixed so they cannot meet a vLLM option.
_DEST_PLUGINS = "griffin_plugins"
_DEST_DENSITY = "griffin_density"
_DEST_METHOD = "griffin_method"
_FLAGS = ("--plugin", "--griffin-density", "--griffin-method")


class GriffinCliError(ValueError):
    """A GRIFFIN command-line flag used wrongly; the message says what to write instead."""


def install_cli_hooks() -> None:
    """Teach vLLM's engine argument parser the GRIFFIN flags. Cheap; safe to call many times."""
    from vllm.engine.arg_utils import EngineArgs

    add_cli_args = EngineArgs.__dict__.get("add_cli_args")
    from_cli_args = EngineArgs.__dict__.get("from_cli_args")
    if not isinstance(add_cli_args, staticmethod) or not isinstance(from_cli_args, classmethod):
        _compat_failure("EngineArgs.add_cli_args (staticmethod) / EngineArgs.from_cli_args (classmethod)")
        return
    if getattr(add_cli_args.__func__, "_griffin_wrapped", False):
        return

    original_add = add_cli_args.__func__
    original_from = from_cli_args.__func__

    @functools.wraps(original_add)
    def add_cli_args_with_griffin(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        add_griffin_arguments(parser)
        return parser

    @functools.wraps(original_from)
    def from_cli_args_with_griffin(cls, args: argparse.Namespace):
        fold_into_additional_config(args)
        warn_api_server_count(args)
        if CONFIG_KEY in (getattr(args, "additional_config", None) or {}):
            validate_openai_requests()  # this process serves GRIFFIN requests
        return original_from(cls, args)

    add_cli_args_with_griffin._griffin_wrapped = True
    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_griffin)
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_griffin)


def _compat_failure(what: str) -> None:
    from vllm_griffin.engine.compat import compat_error

    message = (f"{compat_error(what)} The GRIFFIN serve flags {', '.join(_FLAGS)} are unavailable; "
               "switch GRIFFIN on with vLLM's own flag instead: "
               "--additional-config '{\"griffin\": {\"density\": 0.5}}'.")
    if any(arg.split("=")[0] in _FLAGS for arg in sys.argv[1:]):
        raise GriffinCliError(message)  # the user asked for them: stop before argparse's vaguer error
    logger.debug(message)


_warned_api_servers = False


def validate_openai_requests() -> bool:
    """Check a request's GRIFFIN options (``vllm_xargs``) where vLLM's OpenAI server builds its
    SamplingParams, before any response starts: a bad *streamed* request then gets HTTP 400
    too. (vLLM validates ``extra_args`` when the engine takes a request, which for a stream
    is after its 200 header: the error would come as an event inside the stream.) Returns
    whether the hooks are in place; if vLLM moved them, one warning and the later check stays."""
    import importlib

    from vllm_griffin.engine.compat import SERVE_HOOKS

    for module, path in SERVE_HOOKS:  # where vLLM's OpenAI server turns a request into SamplingParams
        name, attr = path.split(".")
        try:
            cls = getattr(importlib.import_module(module), name)
            original = cls.__dict__[attr]
        except (ImportError, AttributeError, KeyError):
            logger.warning("GRIFFIN: %s.%s.to_sampling_params not found in this vLLM; a bad GRIFFIN option on "
                           "a streamed request is reported inside the stream instead of as HTTP 400",
                           module, name)
            return False
        if getattr(original, "_griffin_wrapped", False):
            continue

        @functools.wraps(original)
        def to_sampling_params(self, *args, _original=original, **kwargs):
            params = _original(self, *args, **kwargs)
            validate_sampling_params(params)  # vLLM's validation error: HTTP 400 naming the field
            return params

        to_sampling_params._griffin_wrapped = True
        setattr(cls, attr, to_sampling_params)
    return True


def warn_api_server_count(args: argparse.Namespace) -> bool:
    """One warning at start-up when GRIFFIN is on behind several API server processes:
    vLLM then serves /metrics from Prometheus' multiprocess files, which GRIFFIN's
    collector does not write. Returns whether it warned."""
    global _warned_api_servers
    count = getattr(args, "api_server_count", None) or 1
    if count <= 1 or CONFIG_KEY not in (getattr(args, "additional_config", None) or {}) or _warned_api_servers:
        return False
    _warned_api_servers = True
    logger.warning("GRIFFIN: --api-server-count %d: /metrics will not include the vllm:griffin_* metrics "
                   "(Prometheus multiprocess mode); GRIFFIN itself runs as usual. Read them with one API "
                   "server, or from the worker with collective_rpc(\"griffin_stats\").", count)
    return True


def add_griffin_arguments(parser) -> None:
    if "--plugin" in getattr(parser, "_option_string_actions", {}):
        return  # already added to this parser (or another plugin owns --plugin)
    group = parser.add_argument_group(
        "GRIFFIN", "vllm-griffin: per-sequence FF expert selection. Folded into "
        "--additional-config '{\"griffin\": {...}}'; per request: vllm_xargs griffin_density / griffin_method.")
    # SUPPRESS: absent flags leave no attribute (and no "(default: None)" in --help).
    group.add_argument("--plugin", dest=_DEST_PLUGINS, action="append", choices=[PLUGIN_NAME],
                       default=argparse.SUPPRESS, help="`--plugin griffin` switches GRIFFIN on for this server.")
    group.add_argument("--griffin-density", dest=_DEST_DENSITY, metavar="D", type=_density_arg,
                       default=argparse.SUPPRESS,
                       help="fraction of FF neurons each sequence keeps, 0 < D <= 1; GRIFFIN's default is 0.5.")
    group.add_argument("--griffin-method", dest=_DEST_METHOD, metavar="M", type=_method_arg,
                       default=argparse.SUPPRESS,
                       help=f"expert selection: {', '.join(METHODS)}; GRIFFIN's default is {GriffinConfig().method} "
                            "(topk is the paper's).")


def _density_arg(text: str) -> float:
    try:
        return check_density(float(text), "--griffin-density", "")
    except (ValueError, GriffinConfigError) as exc:
        allowed = "a number with 0 < density <= 1 (1.0 = dense)"
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: {allowed}") from exc


def _method_arg(text: str) -> str:
    try:
        return check_method(text, "--griffin-method", "")
    except GriffinConfigError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: {', '.join(METHODS)}") from exc


def fold_into_additional_config(args: argparse.Namespace) -> None:
    """Move ``--plugin griffin`` / ``--griffin-*`` into ``args.additional_config["griffin"]``."""
    plugins = getattr(args, _DEST_PLUGINS, None) or []
    flags = {key: getattr(args, dest, None) for key, dest in (("density", _DEST_DENSITY), ("method", _DEST_METHOD))}
    flags = {key: value for key, value in flags.items() if value is not None}
    if not plugins and not flags:
        return
    additional = dict(getattr(args, "additional_config", None) or {})
    if PLUGIN_NAME not in plugins and CONFIG_KEY not in additional:
        raise GriffinCliError(
            f"{', '.join('--griffin-' + key for key in flags)} needs GRIFFIN switched on: add --plugin griffin")
    block = additional.get(CONFIG_KEY)
    if block is None or block is True:
        block = {}
    if not isinstance(block, Mapping):
        return  # GriffinConfig reports the bad block with its own message
    block = dict(block)
    for key, value in flags.items():
        if key in block and block[key] != value:
            raise GriffinCliError(
                f"--griffin-{key} {value} conflicts with --additional-config griffin.{key}={block[key]!r}; "
                "give it once")
        block[key] = value
    additional[CONFIG_KEY] = block
    args.additional_config = additional
    for dest in (_DEST_PLUGINS, _DEST_DENSITY, _DEST_METHOD):
        if hasattr(args, dest):
            delattr(args, dest)  # folded once; a second from_cli_args sees plain vLLM args


def validate_sampling_params(params: Any) -> RequestOptions:
    """The request's GRIFFIN options; a bad value raises vLLM's validation error (HTTP 400)."""
    try:
        return parse_request_options(getattr(params, "extra_args", None))
    except GriffinConfigError as exc:
        from vllm.exceptions import VLLMValidationError

        raise VLLMValidationError(str(exc), parameter=exc.key) from exc
