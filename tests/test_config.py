"""Engine config and per-request options: every bad value names itself and what is allowed."""

from __future__ import annotations

import math

import pytest

from vllm_griffin.core.config import GriffinConfig, GriffinConfigError, RequestOptions, parse_request_options


def test_absent_griffin_key_means_off():
    assert GriffinConfig.from_additional_config(None) is None
    assert GriffinConfig.from_additional_config({}) is None
    assert GriffinConfig.from_additional_config({"other": 1}) is None


def test_defaults_and_values():
    # The default: gated with its own refresh interval (None: the method's, algorithm.DEFAULT_REFRESH).
    assert GriffinConfig.from_additional_config({"griffin": {}}) == GriffinConfig(0.5, "gated", None, 0)
    assert GriffinConfig().method == "gated" and GriffinConfig().refresh is None
    cfg = GriffinConfig.from_additional_config(
        {"griffin": {"density": 0.25, "method": "magnitude", "densities": [0.5, 1], "seed": 7}})
    assert cfg == GriffinConfig(0.25, "magnitude", (0.5, 1.0), 7)
    assert cfg.layer_densities(2) == (0.5, 1.0)
    assert GriffinConfig(0.3).layer_densities(3) == (0.3, 0.3, 0.3)


@pytest.mark.parametrize("raw, key", [
    ({"density": 0}, "density"), ({"density": -0.5}, "density"), ({"density": 1.01}, "density"),
    ({"density": math.nan}, "density"), ({"density": "half"}, "density"), ({"density": True}, "density"),
    ({"method": "top"}, "method"), ({"densities": []}, "densities"), ({"densities": [0.5, 0]}, r"densities\[1\]"),
    ({"densities": "0.5"}, "densities"), ({"seed": 1.5}, "seed"), ({"dense": 0.5}, "dense"),
    ({"cuda_graphs": "yes"}, "cuda_graphs"), ({"cuda_graphs": 1}, "cuda_graphs"),
    ({"refresh": -1}, "refresh"), ({"refresh": 2.5}, "refresh"), ({"refresh": True}, "refresh"),
    ({"refresh": "8"}, "refresh"), ({"refresh": 10**7}, "refresh"), ({"refresh": math.inf}, "refresh"),
    ({"loop_guard": 1}, "loop_guard"), ({"loop_guard": -4}, "loop_guard"), ({"loop_guard": 65}, "loop_guard"),
    ({"loop_guard": 4.5}, "loop_guard"), ({"loop_guard": True}, "loop_guard"),
])
def test_bad_engine_values(raw, key):
    with pytest.raises(GriffinConfigError, match=key) as info:
        GriffinConfig.from_additional_config({"griffin": raw})
    assert "allowed:" in str(info.value)


def test_bad_engine_block_and_layer_count():
    with pytest.raises(GriffinConfigError, match="griffin"):
        GriffinConfig.from_additional_config({"griffin": 0.5})
    with pytest.raises(GriffinConfigError, match="exactly 3 entries"):
        GriffinConfig(densities=(0.5, 0.5)).check_num_layers(3)


def test_request_options_both_spellings():
    assert parse_request_options(None) == RequestOptions()
    assert parse_request_options({"unrelated": 1}) == RequestOptions()
    assert parse_request_options({"griffin": {"density": 0.25, "method": "random"}}) == RequestOptions(0.25, "random")
    assert parse_request_options({"griffin_density": "0.75", "griffin_method": "topk"}) == RequestOptions(0.75, "topk")
    assert parse_request_options({"griffin": {"density": 1}}).density == 1.0


@pytest.mark.parametrize("extra, key", [
    ({"griffin": {"density": 0}}, "griffin.density"), ({"griffin_density": -1}, "griffin_density"),
    ({"griffin_density": 1.5}, "griffin_density"), ({"griffin_density": "nan"}, "griffin_density"),
    ({"griffin_density": "abc"}, "griffin_density"), ({"griffin_method": "x"}, "griffin_method"),
    ({"griffin_dens": 0.5}, "griffin_dens"), ({"griffin": {"k": 3}}, "griffin.k"), ({"griffin": [1]}, "griffin"),
    ({"griffin": {"refresh": -4}}, "griffin.refresh"), ({"griffin_refresh": "often"}, "griffin_refresh"),
    ({"griffin_refresh": "2.5"}, "griffin_refresh"), ({"griffin": {"refresh": [4]}}, "griffin.refresh"),
])
def test_bad_request_values(extra, key):
    with pytest.raises(GriffinConfigError, match=key) as info:
        parse_request_options(extra)
    assert info.value.key == key


def test_refresh_engine_and_request_values():
    assert GriffinConfig.from_additional_config({"griffin": {}}).refresh is None
    assert GriffinConfig.from_additional_config({"griffin": {"refresh": 8, "method": "gated"}}).refresh == 8
    assert GriffinConfig.from_additional_config({"griffin": {"refresh": 8.0}}).refresh == 8  # JSON numbers
    assert parse_request_options({"griffin": {"refresh": 4}}) == RequestOptions(refresh=4)
    assert parse_request_options({"griffin_refresh": "16"}).refresh == 16  # vllm_xargs strings
    assert not parse_request_options({"griffin": {"refresh": 0}}).is_default
    assert parse_request_options({"griffin": {"loop_guard": 8}}) == RequestOptions(loop_guard=8)
    assert parse_request_options({"griffin_loop_guard": "0"}).loop_guard == 0
    assert GriffinConfig.from_additional_config({"griffin": {"loop_guard": 6.0}}).loop_guard == 6
