"""GRIFFIN's settings: the engine-wide ``additional_config["griffin"]`` block and
per-request overrides from ``SamplingParams.extra_args``. No vLLM import, so the
same checks run in the API server, the engine core and the tests."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_griffin.core.algorithm import METHODS

CONFIG_KEY = "griffin"
ENGINE_KEYS = ("density", "method", "densities", "seed", "tp_selection", "cuda_graphs", "refresh", "loop_guard")
# Tensor parallelism: "global" = the exact top-k over all ranks' neurons (what one
# device selects); "per_rank" = floor(density * D/tp) from each rank's own slice.
TP_SELECTIONS = ("global", "per_rank")
REQUEST_KEYS = ("density", "method", "refresh", "loop_guard")
# Refresh intervals above this are "never" for any real generation; a bound keeps
# typos (1e18) out of the arithmetic.
MAX_REFRESH = 1_000_000
# A loop guard matches repeated runs of this many output tokens at most.
MAX_LOOP_GUARD = 64
# Flat spelling for the OpenAI server's `vllm_xargs`, which only carries scalars.
FLAT_PREFIX = "griffin_"


class GriffinConfigError(ValueError):
    """A GRIFFIN setting with a bad value; the message names the key, the value and what is allowed."""

    def __init__(self, key: Any, value: Any, allowed: str, where: str):
        self.key = key if isinstance(key, str) else _short_repr(key)
        self.value = value
        self.allowed = allowed
        super().__init__(f"{where} {self.key}={_short_repr(value)} is invalid; allowed: {allowed}")


# Longest value repr an error message quotes; fuzzed or pasted junk can be megabytes.
_MAX_REPR = 200


def _short_repr(value: Any) -> str:
    # repr itself can fail on junk: ints over sys.get_int_max_str_digits() (ValueError),
    # deeply nested lists (RecursionError). The message must still name the key.
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= _MAX_REPR else f"{text[:_MAX_REPR]}... ({len(text)} chars)"


def check_density(value: Any, key: str, where: str) -> float:
    allowed = "a number with 0 < density <= 1 (1.0 = dense)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GriffinConfigError(key, value, allowed, where)
    # No math.isfinite on ints: 10**400 would raise OverflowError. The chained comparison
    # is exact for any int and False for NaN and +-inf.
    if isinstance(value, float) and not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise GriffinConfigError(key, value, allowed, where)
    return float(value)


def check_method(value: Any, key: str, where: str) -> str:
    if value not in METHODS:
        raise GriffinConfigError(key, value, ", ".join(METHODS), where)
    return value


def check_refresh(value: Any, key: str, where: str) -> int:
    allowed = f"an integer 0 <= refresh <= {MAX_REFRESH} (0 = experts from the prompt only)"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REFRESH:
        raise GriffinConfigError(key, value, allowed, where)
    return value


def check_loop_guard(value: Any, key: str, where: str) -> int:
    allowed = f"0 (off) or an integer 2 <= loop_guard <= {MAX_LOOP_GUARD} (tokens in a repeat)"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not (value == 0 or 2 <= value <= MAX_LOOP_GUARD):
        raise GriffinConfigError(key, value, allowed, where)
    return value


@dataclass(frozen=True)
class GriffinConfig:
    density: float = 0.5
    # `gated` (with its default refresh every 4 tokens): at density 0.5 it keeps far more of
    # dense's answers than the paper's `topk` at the same multiply-adds per sparse token
    # (docs/quality.md). `topk` stays available by name.
    method: str = "gated"
    # One density per decoder layer; overrides `density` when given.
    densities: tuple[float, ...] | None = None
    # Seeds the random/sampling baselines (a request's own `seed` takes precedence).
    seed: int = 0
    tp_selection: str = "global"
    # CUDA: run on Model Runner V2 with CUDA graphs (graph-safe decode path) instead of
    # the eager V1 runner. Off by default until it has run on a GPU here.
    cuda_graphs: bool = False
    # Every `refresh` generated tokens, one token runs the full MLP, its activations join
    # the statistic and the experts are re-selected (0: the paper, prompt only). None: the
    # method's own default (algorithm.DEFAULT_REFRESH: 4 for gated, 0 for the others).
    refresh: int | None = None
    # Also refresh at a generated token whose last `loop_guard` tokens repeat an earlier run
    # of the output (the output has started to loop; 0: never). None: the method's default
    # (algorithm.DEFAULT_LOOP_GUARD).
    loop_guard: int | None = None

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> GriffinConfig | None:
        """The validated config, or None when GRIFFIN is not switched on."""
        # vLLM types additional_config as `dict | SupportsHash`: anything not a mapping
        # belongs to someone else and has no "griffin" key.
        if not isinstance(additional_config, Mapping) or CONFIG_KEY not in additional_config:
            return None
        raw = additional_config[CONFIG_KEY]
        where = 'additional_config["griffin"]:'
        if raw is None or raw is True:
            raw = {}
        if not isinstance(raw, Mapping):
            raise GriffinConfigError("griffin", raw, "a JSON object such as {\"density\": 0.5}", "additional_config:")
        # sorted by repr: JSON keys are strings, but a Python caller's may be anything (1, None).
        unknown = sorted(set(raw) - set(ENGINE_KEYS), key=_short_repr)
        if unknown:
            raise GriffinConfigError(unknown[0], raw[unknown[0]], "keys " + ", ".join(ENGINE_KEYS), where)
        kwargs: dict[str, Any] = {}
        if "density" in raw:
            kwargs["density"] = check_density(raw["density"], "density", where)
        if "method" in raw:
            kwargs["method"] = check_method(raw["method"], "method", where)
        if raw.get("densities") is not None:
            dens = raw["densities"]
            # A list (JSON array) or tuple only: a dict, set or generator would "iterate" into
            # densities nobody wrote (a dict's keys) or an order nobody chose (a set's).
            if not isinstance(dens, (list, tuple)) or len(dens) == 0:
                raise GriffinConfigError("densities", dens, "a non-empty list with one density per layer", where)
            kwargs["densities"] = tuple(check_density(d, f"densities[{i}]", where) for i, d in enumerate(dens))
        if "seed" in raw:
            seed = raw["seed"]
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise GriffinConfigError("seed", seed, "an integer", where)
            kwargs["seed"] = seed
        if "tp_selection" in raw:
            if raw["tp_selection"] not in TP_SELECTIONS:
                raise GriffinConfigError("tp_selection", raw["tp_selection"], ", ".join(TP_SELECTIONS), where)
            kwargs["tp_selection"] = raw["tp_selection"]
        if "cuda_graphs" in raw:
            if not isinstance(raw["cuda_graphs"], bool):
                raise GriffinConfigError("cuda_graphs", raw["cuda_graphs"], "true or false", where)
            kwargs["cuda_graphs"] = raw["cuda_graphs"]
        if "refresh" in raw:
            kwargs["refresh"] = check_refresh(raw["refresh"], "refresh", where)
        if "loop_guard" in raw:
            kwargs["loop_guard"] = check_loop_guard(raw["loop_guard"], "loop_guard", where)
        return cls(**kwargs)

    def check_num_layers(self, num_layers: int) -> None:
        if self.densities is not None and len(self.densities) != num_layers:
            raise GriffinConfigError(
                "densities", list(self.densities), f"needs exactly {num_layers} entries, one per layer of this model",
                'additional_config["griffin"]:')

    def layer_densities(self, num_layers: int) -> tuple[float, ...]:
        return self.densities if self.densities is not None else (self.density,) * num_layers


@dataclass(frozen=True)
class RequestOptions:
    """What one request asked for; None fields fall back to the engine config."""

    density: float | None = None
    method: str | None = None
    refresh: int | None = None
    loop_guard: int | None = None

    @property
    def is_default(self) -> bool:
        return self.density is None and self.method is None and self.refresh is None and self.loop_guard is None


def parse_request_options(extra_args: Mapping[str, Any] | None) -> RequestOptions:
    """Read ``extra_args["griffin"] = {"density": .., "method": ..}`` or the flat
    ``griffin_density`` / ``griffin_method`` keys (what ``vllm_xargs`` sends).
    Raises :class:`GriffinConfigError` naming the field on any bad value."""
    if not extra_args:
        return RequestOptions()
    where = "request extra_args:"
    if not isinstance(extra_args, Mapping):
        raise GriffinConfigError("extra_args", extra_args, "an object (dict) of named arguments", "request:")
    found: dict[str, tuple[str, Any]] = {}
    if CONFIG_KEY in extra_args:
        nested = extra_args[CONFIG_KEY]
        if not isinstance(nested, Mapping):
            raise GriffinConfigError("griffin", nested, "an object with keys " + ", ".join(REQUEST_KEYS), where)
        for key, value in nested.items():
            if key not in REQUEST_KEYS:
                name = "griffin." + (key if isinstance(key, str) else _short_repr(key))
                raise GriffinConfigError(name, value, "keys " + ", ".join(REQUEST_KEYS), where)
            found[key] = (f"griffin.{key}", value)
    flat: dict[str, tuple[str, Any]] = {}
    for flat_key, value in extra_args.items():
        # Other extensions' keys may be anything in a Python caller's dict; only ours are read.
        if not isinstance(flat_key, str) or not flat_key.startswith(FLAT_PREFIX):
            continue
        key = flat_key[len(FLAT_PREFIX):]
        if key not in REQUEST_KEYS:
            allowed = ", ".join(FLAT_PREFIX + k for k in REQUEST_KEYS)
            raise GriffinConfigError(flat_key, value, "keys " + allowed, where)
        flat[key] = (flat_key, value)
    checks = {"refresh": check_refresh, "loop_guard": check_loop_guard, "density": check_density,
              "method": check_method}
    parsed: dict[str, Any] = {}
    for key, check in checks.items():
        # Each spelling is checked on its own, so an error names the field that holds the bad value.
        given = [entry for entry in (found.get(key), flat.get(key)) if entry is not None]
        values = [_checked(check, name, value, where) for name, value in given]
        if len(values) == 2 and values[0] != values[1]:
            raise GriffinConfigError(
                f"{found[key][0]} / {flat[key][0]}", (found[key][1], flat[key][1]),
                "one value: give the option once, or the same value in both spellings", where)
        if values:
            parsed[key] = values[0]
    return RequestOptions(**parsed)


def _checked(check, name: str, value: Any, where: str) -> Any:
    try:
        return check(value if check is check_method else _maybe_number(value), name, where)
    except GriffinConfigError as exc:
        # Quote what the client sent ("1e-400"), not what it parsed to (0.0).
        raise GriffinConfigError(name, value, exc.allowed, where) from None


def _maybe_number(value: Any) -> Any:
    # vllm_xargs values may arrive as strings from some clients ("0.25").
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
