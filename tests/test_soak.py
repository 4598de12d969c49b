"""`vllm-griffin soak` for 60 s: a real server under mixed traffic (streams closed mid-way,
bad options, KV pressure) gives every slot and accumulator back, answers greedy requests
as it would alone, and rejects exactly the bad requests. The 10-minute run's figures are
in docs/serving.md (same command, `--minutes 10`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import run_engine_command

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_soak_for_a_minute(engines, tmp_path):
    out = tmp_path / "soak.json"
    # Seed 0 with a 20 % bad share: client 5's first request carries a bad option.
    cmd = [sys.executable, "-m", "vllm_griffin.tools.cli", "soak", "--minutes", "1", "--interval", "10",
           "--concurrency", "8", "--bad-share", "0.2", "--max-tokens", "48", "--check-alone", "8",
           "--out", str(out)]
    proc = run_engine_command(engines, cmd, cwd=REPO)
    report = json.loads(out.read_text())
    assert proc.returncode == 0, (report["findings"], proc.stdout[-3000:], proc.stderr[-3000:])
    assert report["passed"] and report["findings"] == []
    requests = report["requests"]
    assert requests["completed"] >= 5 and requests["errors"] == 0
    assert requests["rejected_400_as_intended"] >= 1 and requests["rejected_in_stream_as_intended"] == 0
    assert report["preemptions"] > 0, "the small KV cache was meant to make vLLM preempt"
    assert report["idle"] == {"slots_in_use": 0, "accumulators_in_use": 0, "requests_live": 0}
    # Refreshing requests (gated's default) too: a recompute replays their expert history. An
    # answer may part only where its selection is exact (the exported experts match) and the
    # parting is `gated`'s per-token choice, or where the two selections differ by a float near-tie.
    checks = report["alone_checks"]
    assert len(checks) >= 1
    for a in checks:
        assert a["same"] or a["gated_token_choice"] or a["selection_near_tie"], a
        if not a["same"]:
            assert a["selection"] is not None and a["selection"]["statistic_difference"] <= 1e-4, a
    assert len(report["samples"]) >= 3 and all(s["rss_mib"] > 0 for s in report["samples"])
    assert "soak PASSED" in proc.stdout


def test_selection_difference_tells_a_near_tie_from_a_fault(tmp_path):
    """Two exported runs of one request: equal experts, experts flipped at a near-tie of
    statistics equal to rounding, and statistics that really differ."""
    import torch

    from vllm_griffin.core.export import write_experts
    from vllm_griffin.tools.soak import STATISTIC_ROUNDING, _selection_difference

    class Req:  # the fields write_experts reads
        prompt_len, density, method = 5, 0.5, "topk"

        def __init__(self, rid):
            self.req_id = rid

    stat = torch.rand(2, 8) + 0.1
    order = stat[0].argsort(descending=True)
    stat[0, order[4]] = stat[0, order[3]] * (1 - 1e-6)  # the 4th and 5th nearly tied
    top = lambda s: [row.topk(4).indices.sort().values.int() for row in s]  # noqa: E731

    def export(rid, s):
        write_experts(tmp_path, Req(rid), top(s), s)

    export("cmpl-a-0", stat)
    export("cmpl-b-0", stat.clone())
    same = _selection_difference(tmp_path, "cmpl-a", "cmpl-b")
    assert same == {"experts_same": True, "differing_experts": 0, "statistic_difference": 0.0}
    tied = stat.clone()
    tied[0, order[4]] = stat[0, order[3]] * (1 + 1e-6)  # the 5th overtakes the 4th by a rounding
    export("cmpl-c-0", tied)
    flip = _selection_difference(tmp_path, "cmpl-a", "cmpl-c")
    assert not flip["experts_same"] and flip["differing_experts"] == 1
    assert flip["statistic_difference"] <= STATISTIC_ROUNDING
    wrong = stat.clone()
    wrong[1] = wrong[1].flip(0)
    export("cmpl-d-0", wrong)
    assert _selection_difference(tmp_path, "cmpl-a", "cmpl-d")["statistic_difference"] > 0.01
    assert _selection_difference(tmp_path, "cmpl-a", "cmpl-missing") is None


def test_soak_verdict_fails_on_each_finding(tmp_path):
    """The checks themselves (no server): leaks, growth, errors and changed answers fail."""
    import argparse

    from vllm_griffin.tools.soak import Sample, Tally, _verdict

    args = argparse.Namespace(rss_growth=0.05, minutes=1.0)

    def samples(rss):
        return [Sample(seconds=10.0 * i, rss_mib=r, slots_in_use=0, accumulators_in_use=0, griffin_requests_live=0,
                       running=1, waiting=0, tokens_per_s=5.0, preemptions=1) for i, r in enumerate(rss)]

    idle = {"vllm:griffin_slots_in_use": 0, "vllm:griffin_accumulators_in_use": 0, "vllm:griffin_requests_live": 0}
    same = [{"same": True}]
    ok = _verdict(args, Tally(ok=3), samples([1000, 1010, 1005, 1008]), idle, same, [])
    assert ok["passed"], ok["findings"]
    grew = _verdict(args, Tally(ok=3), samples([1000, 1000, 1100, 1200, 1300]), idle, same, [])
    assert not grew["passed"] and "RSS grew" in grew["findings"][0]
    held = _verdict(args, Tally(ok=3), samples([1000] * 4), {**idle, "vllm:griffin_slots_in_use": 2}, same, [])
    assert "still held once idle" in held["findings"][0]
    errors = _verdict(args, Tally(ok=3, errors=["APIError: boom"]), samples([1000] * 4), idle, same, [])
    assert errors["findings"] == ["APIError: boom"]
    changed = _verdict(args, Tally(ok=3), samples([1000] * 4), idle, [{"same": False}], [])
    assert "answered differently alone" in changed["findings"][0]
    # Parted after a float near-tie in the selection (statistics equal to rounding, experts not): passes.
    near_tie = [{"same": False, "selection_near_tie": True}]
    assert _verdict(args, Tally(ok=3), samples([1000] * 4), idle, near_tie, [])["passed"]
    # `gated` parting on exactly the same experts: its per-token choice (reported, not failed).
    gated = [{"same": False, "gated_token_choice": True}]
    assert _verdict(args, Tally(ok=3), samples([1000] * 4), idle, gated, [])["passed"]
    # RSS growth on top of plain vLLM's (a --without-griffin run's JSON).
    import json

    control = tmp_path / "control.json"
    control.write_text(json.dumps({"settings": {"without_griffin": True}, "rss_mib": {"second_half_growth": 0.2}}))
    grew_like_vllm = samples([1000, 1000, 1100, 1200, 1300])
    args.rss_baseline = str(control)
    assert _verdict(args, Tally(ok=3), grew_like_vllm, idle, same, [])["passed"]
    args.rss_baseline = None
    over = _verdict(args, Tally(ok=3), samples([1000] * 4), idle, same, ["3 slots in use for 1 live requests"])
    assert not over["passed"]
