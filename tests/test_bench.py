"""`vllm-griffin bench` runs end to end (the performance command of docs/speed.md, shrunk):
one SmolLM2 engine on HumanEval prompts at their own lengths, batch sizes 1 and 3,
density 0.5, a few tokens. Figures on a
shared 2-core CPU are noise at this size, so only their presence and consistency
are checked here; the speed targets live in the benchmark's own output."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from tests.conftest import run_engine_command


def test_bench_methods_parse_and_bad_ones_are_named():
    from vllm_griffin.tools.bench import parse_method

    assert parse_method("topk") == ("topk", {})
    assert parse_method("gated+refresh8") == ("gated", {"refresh": 8})
    assert parse_method("gated+refresh4+guard8") == ("gated", {"refresh": 4, "loop_guard": 8})
    for bad in ("nope", "topk+refresh", "topk+often4", "topk+refresh-1", "gated+refresh99999999",
                "topk+guard1", "topk+guard4+guard8", "topk+refresh4+"):
        with pytest.raises(ValueError, match="allowed"):
            parse_method(bad)


@pytest.mark.slow
def test_bench_writes_consistent_results(engines, tmp_path, smollm2_dir):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "vllm_griffin.tools.cli", "bench", "--models", "smollm2", "--batch-sizes", "1,3",
           "--densities", "0.5", "--gen-len", "4", "--repeats", "1", "--decode-seconds", "0.3",
           "--prefill-repeats", "2", "--prefill-seconds", "0.5", "--prompts", "humaneval", "--out", str(out)]
    done = run_engine_command(engines, cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    runs = {(r["batch"], r["density"]): r for r in results["runs"]}
    assert sorted(runs) == [(1, 0.5), (1, 1.0), (3, 0.5), (3, 1.0)]
    # Real prompts: the first problems, tokenized for the model, at their own lengths.
    from transformers import AutoTokenizer

    from vllm_griffin.tools.eval_humaneval import load_problems

    lengths = [len(AutoTokenizer.from_pretrained(smollm2_dir)(p["prompt"])["input_ids"]) for p in load_problems(limit=3)]
    for (batch, _), r in runs.items():
        assert r["prompts"] == "humaneval" and r["prompt_tokens"] == pytest.approx(statistics.mean(lengths[:batch]))
    for (batch, density), r in runs.items():
        assert r["prefill_s"] == statistics.median(r["prefill_samples"]) > 0
        # Rounds: at least 1, more until each density has 0.3 s of full decode steps.
        rounds = len(r["samples"])
        assert rounds == len(runs[(batch, 1.0 if density < 1.0 else 0.5)]["samples"])
        assert rounds == len(r["round_step_medians"]) and 1 <= rounds <= 12
        for _, _, n in r["samples"]:
            # 4 tokens each; decode counts those after every request has its first one.
            assert n == 3 if batch == 1 else 0 < n <= batch * 3
        # Throughput: the batch over the median step in which every request got a token.
        assert 0 < len(r["step_seconds"]) <= 3 * rounds
        assert r["decode_tok_s"] == pytest.approx(batch / statistics.median(r["step_seconds"]))
        # Dense is vLLM's own MLP (no GRIFFIN decode path); 0.5 decodes on experts.
        assert bool(r["decode_paths"]) == (density < 1.0)
        # The worker-timed capture + selection: one figure per prefill, none for dense.
        work = r["prefill_griffin_samples"]
        assert len(work) == len(r["prefill_samples"]) and r["prefill_griffin_s"] == statistics.median(work)
        if density == 1.0:
            assert all(w == 0 for w in work)
        else:
            assert all(0 < w < p for w, p in zip(work, r["prefill_samples"]))
    for batch in (1, 3):
        steps = {d: sum(runs[(batch, d)]["step_seconds"]) for d in (0.5, 1.0)}
        rounds = len(runs[(batch, 0.5)]["samples"])
        assert min(steps.values()) >= 0.3 or rounds == 12
        # Prefill samples: the decode runs', then prefill-only rounds until each density
        # has 2 samples and 0.5 s, and no more.
        for d in (0.5, 1.0):
            assert runs[(batch, d)]["prefill_samples"][:rounds] == [s[0] for s in runs[(batch, d)]["samples"]]
        counts = {len(runs[(batch, d)]["prefill_samples"]) for d in (0.5, 1.0)}
        assert len(counts) == 1 and (n := counts.pop()) >= 2
        least = min(sum(runs[(batch, d)]["prefill_samples"]) for d in (0.5, 1.0))
        before_last = min(sum(runs[(batch, d)]["prefill_samples"][:-1]) for d in (0.5, 1.0))
        assert least >= 0.5 or n == rounds + 32
        assert n == max(2, rounds) or before_last < 0.5
    assert runs[(1, 0.5)]["union_fraction"] == pytest.approx(0.5, abs=1e-3)  # one request: its own k/D
    assert 0.5 <= runs[(3, 0.5)]["union_fraction"] <= 1.0
    summary = {(r["batch"], r["density"]): r for r in results["summary"]}
    for key, row in summary.items():
        # Ratios paired within rounds: the median of dense step / GRIFFIN step per round.
        dense, griffin = runs[(key[0], 1.0)], runs[key]
        per_round = [a / b for a, b in zip(dense["round_step_medians"], griffin["round_step_medians"]) if a and b]
        assert row["vs_dense"] == pytest.approx(statistics.median(per_round))
        per_prefill = [a / b for a, b in zip(griffin["prefill_samples"], dense["prefill_samples"])]
        assert row["prefill_overhead"] == pytest.approx(statistics.median(per_prefill) - 1.0)
        assert row["prefill_griffin_share"] == pytest.approx(griffin["prefill_griffin_s"] / dense["prefill_s"])
        for run, steps in ((dense, dense["step_seconds"]), (griffin, griffin["step_seconds"])):
            assert all(m is None or min(steps) <= m <= max(steps) for m in run["round_step_medians"])
    assert out.with_suffix(".md").read_text().count("| smollm2 |") == 2
    assert Path(out.with_suffix(".png")).stat().st_size > 0
