"""`vllm-griffin eval xsum` / `plot overlap` on a real engine (SmolLM2, 2 rows, few tokens),
plus the input errors, which need no engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_engine_command
from vllm_griffin.tools import eval_common as quality_eval
from vllm_griffin.tools.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_bad_inputs_name_the_value(tmp_path, capsys):
    assert main(["eval", "xsum", "--model", "smollm2-135m-instruct", "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"article": "x"}) + "\n")
    assert main(["eval", "xsum", "--model", "smollm2-135m-instruct", "--data", str(bad)]) == 2
    assert "summary_gt" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"article": "x", "summary_gt": "y"}) + "\n")
    assert main(["eval", "xsum", "--model", "smollm2-135m-instruct", "--data", str(good), "--methods", "topk,nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "topk_down_first_dense" in err
    assert main(["eval", "xsum", "--model", "no-such-model", "--data", str(good)]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["eval", "xsum", "--model", "smollm2-135m-instruct", "--data", str(good), "--densities", "0.5,2"]) == 2
    assert "'2'" in capsys.readouterr().err


def test_plan_asks_dense_once_per_setting():
    rows = [{"index": 0}, {"index": 1}]
    jobs = quality_eval.plan_jobs(rows, ["greedy", "paper"], ["full", "topk"], [0.5, 1.0])
    cells = sorted({(j.setting, j.method, j.density) for j in jobs})
    assert cells == [("greedy", "full", 1.0), ("greedy", "topk", 0.5), ("paper", "full", 1.0), ("paper", "topk", 0.5)]
    assert len(jobs) == 2 * len(cells)


@pytest.mark.slow
def test_xsum_eval_on_an_engine(engines, tmp_path, smollm2_dir):
    """Two rows, 8 greedy tokens, dense + topk + topk_down_first_dense + topk_magnitude at 0.5, experts exported:
    the JSON holds real outputs, its ROUGE is recomputable from them, dense equals the
    Hugging Face model's greedy tokens, and the exported experts give an overlap table."""
    out, experts = tmp_path / "r.json", tmp_path / "experts"
    cmd = [sys.executable, "-m", "vllm_griffin.tools.cli", "eval", "xsum", "--model", "smollm2-135m-instruct",
           "--limit", "2", "--setting", "greedy", "--methods", "full,topk,topk_down_first_dense,topk_magnitude", "--densities", "0.5",
           "--max-tokens", "8", "--dtype", "float32", "--out", str(out), "--export-experts", str(experts)]
    try:
        quality_eval.resolve_data(None)
    except quality_eval.EvalError:  # a clone without ../shared beside it: two rows of our own
        data = tmp_path / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in [
            {"article": "Article: The town council approved a new park on Monday.\nSummary:", "summary_gt": "A park is approved."},
            {"article": "Article: Heavy rain flooded roads across the county.\nSummary:", "summary_gt": "Rain floods roads."}]))
        cmd += ["--data", str(data)]
    proc = run_engine_command(engines, cmd, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0 and "| greedy | full |" in out.with_suffix(".md").read_text()
    assert {(e["method"], e["density"], e["rows"]) for e in result["summary"]} == {
        ("full", 1.0, 2), ("topk", 0.5, 2), ("topk_down_first_dense", 0.5, 2), ("topk_magnitude", 0.5, 2)}
    samples = result["samples"]
    assert len(samples) == 8 and all(s["generated_tokens"] > 0 for s in samples)
    # ROUGE comes from the stored predictions.
    recomputed = quality_eval.rouge_scores([s["prediction"] for s in samples],
                                           [quality_eval.load_rows(Path(result["data"]))[s["row"]]["summary_gt"]
                                            for s in samples])
    for s, r in zip(samples, recomputed):
        assert s["rougeL"] == pytest.approx(r["rougeL"]) and s["rouge1"] == pytest.approx(r["rouge1"])
    full = next(e for e in result["summary"] if e["method"] == "full")
    assert full["rougeL"] == pytest.approx(sum(s["rougeL"] for s in samples if s["method"] == "full") / 2)

    # Dense ("full") is the plain model: the same text as Hugging Face greedy decoding.
    from tests.conftest import hf_model
    from vllm_griffin.tools import hf_griffin

    model = hf_model(smollm2_dir)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    rows = quality_eval.load_rows(Path(result["data"]), 2)
    for s in (s for s in samples if s["method"] == "full"):
        ids = tok(rows[s["row"]]["article"]).input_ids
        hf = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):]
        assert s["prediction"] == quality_eval.clean_summary(tok.decode(hf, skip_special_tokens=True))

    # The engine's experts for the new methods equal the HF-side selection (same math).
    from vllm_griffin.core.export import read_experts

    weights = hf_griffin.layer_weights(model)
    for s in (s for s in samples if s["method"] in ("topk_down_first_dense", "topk_magnitude")):
        got, meta = read_experts(experts / f"{s['request_id']}.safetensors")
        assert meta["method"] == s["method"]
        _, acts = hf_griffin.prefill(model, tok(rows[s["row"]]["article"]).input_ids)
        want = hf_griffin.select(acts, 0.5, s["method"], weights)
        first = 1536 if s["method"] == "topk_down_first_dense" else 768  # first_dense: layer 0 doubled
        assert [len(g) for g in got] == [len(w) for w in want] and len(got[0]) == first
        mismatched = [i for i, (g, w) in enumerate(zip(got, want)) if g.long().tolist() != w.tolist()]
        assert not mismatched, f"layers {mismatched} differ"

    overlap = tmp_path / "overlap.json"
    assert main(["plot", "overlap", "--experts", str(experts), "--out", str(overlap)]) == 0
    groups = {(g["method"], g["density"]): g for g in json.loads(overlap.read_text())["groups"]}
    assert set(groups) == {("topk", 0.5), ("topk_down_first_dense", 0.5), ("topk_magnitude", 0.5)}
    g = groups[("topk", 0.5)]
    assert g["requests"] == 2 and len(g["layers"]) == 30
    assert all(0.0 < p["mean"] <= 1.0 for p in g["layers"])
