"""Fuzzed GRIFFIN options (issue 16, item 4): every way options reach GRIFFIN either
accepts a value with its documented meaning (docs/usage.md, "Engine configuration" and
"Per-request options") or rejects it with :class:`GriffinConfigError` naming the field
and what is allowed; never another exception, never a value outside the documented range.

The three ways in:

* the engine's ``additional_config["griffin"]`` (``GriffinConfig.from_additional_config``);
* ``SamplingParams.extra_args``, nested ``{"griffin": {...}}`` and flat ``griffin_*``
  (``parse_request_options``);
* the OpenAI server's ``vllm_xargs``: pydantic first coerces the JSON body to vLLM's field
  type (``dict[str, str | int | float | list[str | int | float]]``, copied below so the test
  needs no vLLM import), then the dict becomes ``extra_args``; plus the ``--griffin-density``
  / ``--griffin-method`` serve flags (argparse type functions in ``serving``).

Each test compares the code with an independent oracle written from the documentation.
Deterministic (``derandomize=True``); the whole file runs in a few seconds.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_griffin.core.algorithm import METHODS
from vllm_griffin.core.config import (
    ENGINE_KEYS,
    MAX_LOOP_GUARD,
    MAX_REFRESH,
    REQUEST_KEYS,
    TP_SELECTIONS,
    GriffinConfig,
    GriffinConfigError,
    RequestOptions,
    parse_request_options,
)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_SMALL = settings(FUZZ, max_examples=150)

REJECT = object()  # the oracle's "must raise GriffinConfigError"


# -- inputs ---------------------------------------------------------------------------------

SPECIAL_NUMBERS = [
    0, 1, -1, 2, 4, 0.5, 1.0, 0.25, 1e-300, 5e-324, -5e-324, -0.0, 0.0, 1.0000000000000002, 0.9999999999999999,
    1e308, -1e308, 1.7976931348623157e308, math.nan, -math.nan, math.inf, -math.inf, 2**53 + 1, 2**63, 2**64,
    2**70, -(2**70), 10**400, MAX_REFRESH, MAX_REFRESH + 1, MAX_REFRESH - 0.5, float(MAX_REFRESH),
    1e6, 1e7, 8.0, 7.5, True, False,
]
SPECIAL_STRINGS = [
    "", " ", "0", "1", "0.5", " 0.5 ", "0.5\n", "1e-400", "1e400", "-0", "-0.0", "nan", "NaN", "-nan", "inf",
    "-inf", "Infinity", "1_0", "0x10", "1/2", "٠.٥", "１", "16", "16.0", "4.5", "1e6", "1000001", "9" * 400,
    "true", "True", "null", "None", "[]", "{}", "topk", "TOPK", " topk", "topk\x00", "gated", "global", "per_rank",
    "\ud800", "🙂", "density", "griffin",
] + list(METHODS) + list(TP_SELECTIONS)

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=0.0, max_value=1.0),
    st.sampled_from(SPECIAL_NUMBERS), st.sampled_from(SPECIAL_STRINGS),
    st.text(max_size=12), st.binary(max_size=6),
)
# Nested junk: lists where scalars go, dicts (string and non-string keys), tuples.
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(list(ENGINE_KEYS) + ["griffin"])),
                        inner, max_size=3),
        st.dictionaries(st.one_of(st.integers(), st.none(), st.booleans()), inner, max_size=2)),
    max_leaves=8)

valid_density = st.one_of(st.floats(min_value=5e-324, max_value=1.0), st.just(1), st.sampled_from([0.5, 1.0, 0.25]))
valid_refresh = st.one_of(st.integers(0, MAX_REFRESH), st.integers(0, MAX_REFRESH).map(float))
valid_loop_guard = st.one_of(st.just(0), st.integers(2, MAX_LOOP_GUARD), st.integers(2, MAX_LOOP_GUARD).map(float))

ENGINE_VALUES = {
    "density": st.one_of(valid_density, junk),
    "method": st.one_of(st.sampled_from(METHODS), junk),
    "densities": st.one_of(st.lists(st.one_of(valid_density, junk), max_size=5), st.lists(valid_density, max_size=5),
                           st.tuples(valid_density, valid_density), junk),
    "seed": st.one_of(st.integers(), junk),
    "tp_selection": st.one_of(st.sampled_from(TP_SELECTIONS), junk),
    "cuda_graphs": st.one_of(st.booleans(), junk),
    "refresh": st.one_of(valid_refresh, junk),
    "loop_guard": st.one_of(valid_loop_guard, st.sampled_from([1, -2, MAX_LOOP_GUARD + 1, 2.5]), junk),
}
unknown_key = st.one_of(
    st.text(max_size=10).filter(lambda k: k not in ENGINE_KEYS),
    st.sampled_from(["Density", "density ", "griffin", "k", "refresh_every", "densitys", ""]),
    st.integers(), st.none(), st.booleans(), st.tuples(st.integers()))


# -- the oracle: the documented meaning of each field -----------------------------------------

def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def want_density(value: Any) -> Any:
    """docs/usage.md: 0 < d <= 1 (a number; not a bool)."""
    if not is_number(value):
        return REJECT
    if isinstance(value, float) and not math.isfinite(value):
        return REJECT
    return float(value) if 0 < value <= 1 else REJECT  # exact for ints of any size


def want_refresh(value: Any) -> Any:
    """docs/usage.md: integer 0 <= R <= 1000000 (JSON numbers such as 8.0 count as integers)."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if not is_number(value) or not isinstance(value, int) or not 0 <= value <= MAX_REFRESH:
        return REJECT
    return value


def want_loop_guard(value: Any) -> Any:
    """docs/usage.md: 0 (off) or an integer 2 <= n <= 64 (JSON numbers such as 4.0 count as integers)."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if not is_number(value) or not isinstance(value, int) or not (value == 0 or 2 <= value <= MAX_LOOP_GUARD):
        return REJECT
    return value


def want_method(value: Any) -> Any:
    return value if isinstance(value, str) and value in METHODS else REJECT


def want_seed(value: Any) -> Any:
    return value if isinstance(value, int) and not isinstance(value, bool) else REJECT


def want_tp_selection(value: Any) -> Any:
    return value if isinstance(value, str) and value in TP_SELECTIONS else REJECT


def want_cuda_graphs(value: Any) -> Any:
    return value if isinstance(value, bool) else REJECT


def want_densities(value: Any) -> tuple[Any, str]:
    """(expected tuple or REJECT, the field an error must name)."""
    if not isinstance(value, (list, tuple)) or not value:
        return REJECT, "densities"
    out = []
    for i, d in enumerate(value):
        got = want_density(d)
        if got is REJECT:
            return REJECT, f"densities[{i}]"
        out.append(got)
    return tuple(out), ""


ENGINE_ORACLE = {"density": want_density, "method": want_method, "seed": want_seed,
                 "tp_selection": want_tp_selection, "cuda_graphs": want_cuda_graphs, "refresh": want_refresh,
                 "loop_guard": want_loop_guard}


def from_xargs_string(value: Any) -> Any:
    """Per request, numbers may come as strings ("0.25", "16"): Python's float() spelling."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


REQUEST_ORACLE = {"density": lambda v: want_density(from_xargs_string(v)),
                  "refresh": lambda v: want_refresh(from_xargs_string(v)),
                  "loop_guard": lambda v: want_loop_guard(from_xargs_string(v)),
                  "method": want_method}


def same(a: Any, b: Any) -> bool:
    """Equal and of the same type (1.0 == 1 == True would hide a bool or an int slipping through)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return type(a) is type(b) and a == b


def check_error(exc: GriffinConfigError, fields: set[str]) -> None:
    """A rejection names one of the offending fields and says what is allowed."""
    assert isinstance(exc.key, str)
    assert exc.key in fields, (exc.key, fields, str(exc))
    message = str(exc)
    assert exc.key in message and "allowed: " in message and message.split("allowed: ", 1)[1].strip()
    assert len(message) < 1000 + len(exc.key), len(message)  # junk values are quoted, not dumped


def run(fn, *args) -> tuple[Any, GriffinConfigError | None]:
    """Call fn; only GriffinConfigError may escape (anything else fails the test as is)."""
    try:
        return fn(*args), None
    except GriffinConfigError as exc:
        return None, exc


# -- engine: additional_config["griffin"] ---------------------------------------------------

@FUZZ
@given(key=st.sampled_from(ENGINE_KEYS), data=st.data())
def test_engine_one_key(key, data):
    check_engine_one(key, data.draw(ENGINE_VALUES[key], label=key))


# Every special value at every key, whatever hypothesis happens to draw.
GRID = SPECIAL_NUMBERS + SPECIAL_STRINGS + [
    None, [], [0.5], [[0.5]], [0.5, math.nan], (0.5, 1), {}, {"density": 0.5}, {0.5: 1}, {0.5}, frozenset([1.0]),
    b"0.5", bytearray(b"1"), 1j, [True], ["0.5"], [10**400],
]


@pytest.mark.parametrize("key", ENGINE_KEYS)
def test_engine_grid(key):
    for value in GRID:
        check_engine_one(key, value)


@pytest.mark.parametrize("key", REQUEST_KEYS)
def test_request_grid(key):
    for value in GRID:
        check_request({"griffin": {key: value}})
        check_request({"griffin_" + key: value})
        check_request({"griffin": {key: value}, "griffin_" + key: value})


def check_engine_one(key: str, value: Any) -> None:
    cfg, exc = run(GriffinConfig.from_additional_config, {"griffin": {key: value}})
    if key == "densities":
        want, field = want_densities(value) if value is not None else (None, "")  # None: not given
    else:
        want, field = ENGINE_ORACLE[key](value), key
    if want is REJECT:
        assert exc is not None, f"{key}={value!r} accepted as {cfg!r}"
        check_error(exc, {field})
        return
    assert exc is None, f"{key}={value!r} rejected: {exc}"
    assert same(getattr(cfg, key), want), (key, value, getattr(cfg, key))
    if key in ("density", "densities"):
        assert all(0 < d <= 1 and math.isfinite(d) for d in cfg.layer_densities(len(cfg.densities or (1,))))


@FUZZ
@given(block=st.dictionaries(st.sampled_from(ENGINE_KEYS), st.none(), max_size=7).flatmap(
           lambda keys: st.fixed_dictionaries({k: ENGINE_VALUES[k] for k in keys})),
       extra=st.dictionaries(unknown_key, junk, max_size=2))
def test_engine_block(block, extra):
    raw = {**block, **extra}
    cfg, exc = run(GriffinConfig.from_additional_config, {"griffin": raw, "unrelated": 1})
    bad: set[str] = {k if isinstance(k, str) else repr(k) for k in extra}  # unknown keys are named too
    want: dict[str, Any] = {}
    for key, value in block.items():
        if key == "densities":
            if value is None:
                continue
            got, field = want_densities(value)
        else:
            got, field = ENGINE_ORACLE[key](value), key
        if got is REJECT:
            bad.add(field)
        else:
            want[key] = got
    if bad:
        assert exc is not None, f"{raw!r} accepted as {cfg!r}"
        check_error(exc, bad)
        return
    assert exc is None, f"{raw!r} rejected: {exc}"
    defaults = GriffinConfig()
    for key in ENGINE_KEYS:
        assert same(getattr(cfg, key), want.get(key, getattr(defaults, key))), (key, raw, cfg)


@FUZZ_SMALL
@given(raw=junk)
def test_engine_block_of_any_type(raw):
    cfg, exc = run(GriffinConfig.from_additional_config, {"griffin": raw})
    if raw is None or raw is True or raw == {}:
        assert cfg == GriffinConfig() and exc is None  # switched on with the defaults
    elif not isinstance(raw, dict):
        check_error(exc, {"griffin"})
    # a dict: test_engine_block covers it; here only "no other exception"


@FUZZ_SMALL
@given(additional=st.one_of(junk, st.dictionaries(st.text(max_size=6), junk, max_size=3)))
def test_engine_additional_config_without_griffin(additional):
    if isinstance(additional, dict) and "griffin" in additional:
        return
    # vLLM types additional_config as `dict | SupportsHash`: no "griffin" key means GRIFFIN is off.
    assert GriffinConfig.from_additional_config(additional) is None


@FUZZ_SMALL
@given(densities=st.lists(valid_density, min_size=1, max_size=6), layers=st.integers(0, 8))
def test_engine_densities_layer_count(densities, layers):
    cfg = GriffinConfig.from_additional_config({"griffin": {"densities": densities}})
    assert cfg.densities == tuple(float(d) for d in densities)
    cfg_ok, exc = run(cfg.check_num_layers, layers)
    if layers == len(densities):
        assert exc is None and cfg.layer_densities(layers) == cfg.densities
    else:
        check_error(exc, {"densities"})
        assert f"exactly {layers} entries" in str(exc)


# -- per request: SamplingParams.extra_args -------------------------------------------------

REQUEST_VALUES = {
    "density": st.one_of(valid_density, valid_density.map(repr), junk),
    "method": st.one_of(st.sampled_from(METHODS), junk),
    "refresh": st.one_of(valid_refresh, valid_refresh.map(lambda r: str(int(r))), junk),
    "loop_guard": st.one_of(valid_loop_guard, valid_loop_guard.map(lambda r: str(int(r))), junk),
}
request_subset = st.dictionaries(st.sampled_from(REQUEST_KEYS), st.none(), max_size=3).flatmap(
    lambda keys: st.fixed_dictionaries({k: REQUEST_VALUES[k] for k in keys}))
unrelated_args = st.dictionaries(
    st.one_of(st.text(max_size=8).filter(lambda k: not k.startswith("griffin")), st.integers(), st.none(),
              st.sampled_from(["kv_transfer_params", "session_id", "Griffin_density", "griffin-density"])),
    junk, max_size=3)
unknown_request_key = st.one_of(st.text(max_size=8), st.sampled_from(["k", "dens", "seed", "densities", ""]),
                                st.integers(), st.none()).filter(lambda k: k not in REQUEST_KEYS)


def expected_request(extra_args: Any) -> tuple[Any, set[str]]:
    """(RequestOptions, or REJECT with the set of fields an error may name)."""
    if not extra_args:
        return RequestOptions(), set()
    if not isinstance(extra_args, dict):
        return REJECT, {"extra_args"}
    bad: set[str] = set()
    given_: dict[str, list[tuple[str, Any]]] = {key: [] for key in REQUEST_KEYS}
    if "griffin" in extra_args:
        nested = extra_args["griffin"]
        if not isinstance(nested, dict):
            bad.add("griffin")
        else:
            for key, value in nested.items():
                name = "griffin." + (key if isinstance(key, str) else repr(key))
                (given_[key].append((name, value)) if key in REQUEST_KEYS else bad.add(name))
    for key, value in extra_args.items():
        if isinstance(key, str) and key.startswith("griffin_"):
            short = key[len("griffin_"):]
            (given_[short].append((key, value)) if short in REQUEST_KEYS else bad.add(key))
    parsed: dict[str, Any] = {}
    for key, spellings in given_.items():
        values = []
        for name, value in spellings:
            got = REQUEST_ORACLE[key](value)
            (bad.add(name) if got is REJECT else values.append(got))
        if len(values) == 2 and values[0] != values[1]:  # both spellings, different values
            bad.add(" / ".join(name for name, _ in spellings))
        elif values:
            parsed[key] = values[0]
    return (REJECT, bad) if bad else (RequestOptions(**parsed), set())


def check_request(extra_args: Any) -> RequestOptions | None:
    opts, exc = run(parse_request_options, extra_args)
    want, fields = expected_request(extra_args)
    if want is REJECT:
        assert exc is not None, f"{extra_args!r} accepted as {opts!r}"
        check_error(exc, fields)
        return None
    assert exc is None, f"{extra_args!r} rejected: {exc}"
    for key in REQUEST_KEYS:
        assert same(getattr(opts, key), getattr(want, key)), (key, extra_args, opts)
    if opts.density is not None:
        assert 0 < opts.density <= 1
    if opts.refresh is not None:
        assert 0 <= opts.refresh <= MAX_REFRESH and type(opts.refresh) is int
    return opts


@FUZZ
@given(nested=st.one_of(st.none(), request_subset, junk), nested_extra=st.dictionaries(unknown_request_key, junk, max_size=1),
       flat=request_subset, flat_extra=st.dictionaries(st.text(max_size=6).map(lambda s: "griffin_" + s), junk,
                                                        max_size=1),
       unrelated=unrelated_args, use_nested=st.booleans(), use_extra=st.booleans())
def test_request_extra_args(nested, nested_extra, flat, flat_extra, unrelated, use_nested, use_extra):
    extra_args: dict[Any, Any] = dict(unrelated)
    if use_nested:
        if isinstance(nested, dict) and use_extra:
            nested = {**nested, **nested_extra}
        extra_args["griffin"] = nested
    extra_args.update({"griffin_" + k: v for k, v in flat.items()})
    if use_extra:
        extra_args.update(flat_extra)
    check_request(extra_args)


@FUZZ
@given(key=st.sampled_from(REQUEST_KEYS), nested_value=st.data(), spelling=st.sampled_from(["same", "other", "junk"]))
def test_request_both_spellings(key, nested_value, spelling):
    """The same option nested and flat: the same value is fine, different values are refused."""
    first = nested_value.draw(REQUEST_VALUES[key], label="nested")
    second = {"same": first, "other": nested_value.draw(REQUEST_VALUES[key], label="flat"),
              "junk": nested_value.draw(junk, label="flat")}[spelling]
    opts = check_request({"griffin": {key: first}, "griffin_" + key: second})
    if opts is not None:
        assert getattr(opts, key) == REQUEST_ORACLE[key](first) == REQUEST_ORACLE[key](second)


@FUZZ_SMALL
@given(extra_args=st.one_of(junk, st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), junk, max_size=4)))
def test_request_extra_args_of_any_shape(extra_args):
    check_request(extra_args)


# -- per request from the OpenAI server: vllm_xargs -----------------------------------------

# vLLM 0.x: CompletionRequest / ChatCompletionRequest.vllm_xargs (see the module docstring).
XARGS_TYPE = dict[str, str | int | float | list[str | int | float]] | None

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                        st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(SPECIAL_NUMBERS),
                        st.sampled_from(SPECIAL_STRINGS), st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                               st.dictionaries(st.text(max_size=5), inner, max_size=2)),
                          max_leaves=5)
xargs_key = st.one_of(st.sampled_from(["griffin_" + k for k in REQUEST_KEYS]),
                      st.sampled_from(["griffin_seed", "griffin_", "griffin", "session_id", "griffin_Density"]),
                      st.text(max_size=6))


@pytest.fixture(scope="module")
def xargs_adapter():
    pydantic = pytest.importorskip("pydantic")
    return pydantic.TypeAdapter(XARGS_TYPE)


@FUZZ
@given(body=st.dictionaries(xargs_key, st.one_of(json_value, valid_density, valid_density.map(str),
                                                 valid_refresh.map(lambda r: str(int(r))), st.sampled_from(METHODS)),
                            max_size=4),
       as_json=st.booleans())
def test_request_vllm_xargs(xargs_adapter, body, as_json):
    from pydantic import ValidationError

    try:
        # The server parses the JSON body (NaN / Infinity tokens included) and coerces it to the field's type.
        xargs = xargs_adapter.validate_json(json.dumps(body)) if as_json else xargs_adapter.validate_python(body)
    except ValidationError:
        return  # HTTP 400 from vLLM's own request model before GRIFFIN sees it
    except ValueError:
        return  # json.dumps of an int past Python's digit limit
    check_request(xargs)


# -- the serve flags: --griffin-density / --griffin-method (folded into additional_config) --

@FUZZ_SMALL
@given(text=st.one_of(st.sampled_from(SPECIAL_STRINGS), st.text(max_size=12), valid_density.map(repr)))
def test_serve_flags(text):
    from vllm_griffin.engine import serving

    for parse, want in ((serving._density_arg, lambda t: want_density(from_xargs_string(t))),
                        (serving._method_arg, want_method)):
        expected = want(text)
        try:
            got = parse(text)
        except argparse.ArgumentTypeError as exc:  # argparse prints it as "argument --griffin-...: <message>"
            assert expected is REJECT, (text, str(exc))
            assert "allowed: " in str(exc)
            continue
        assert expected is not REJECT and same(got, expected), (text, got)
        # What the flag folds into must pass the engine check with the same meaning.
        key = "density" if parse is serving._density_arg else "method"
        assert same(getattr(GriffinConfig.from_additional_config({"griffin": {key: got}}), key), got)


# -- values hypothesis cannot print: ints past Python's str-conversion digit limit, deep nesting --

def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("value", [10**5000, -(10**5000), _deep(100_000)], ids=["10**5000", "-10**5000", "deep"])
def test_unprintable_values(value):
    for key in ("density", "refresh", "seed", "method", "densities", "nope"):
        cfg, exc = run(GriffinConfig.from_additional_config, {"griffin": {key: value}})
        if key == "seed" and isinstance(value, int):
            assert cfg.seed == value  # any integer (state.py mixes it modulo 2**63 - 1)
        else:
            check_error(exc, {key, f"{key}[0]"})  # a deep list as densities: its first entry is bad
    for extra in ({"griffin": {"density": value}}, {"griffin_refresh": value}, {"griffin_x": value},
                  {"griffin": value}):
        check_request(extra)
