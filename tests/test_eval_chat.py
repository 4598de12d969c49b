"""`vllm-griffin eval chat`: the shipped prompts, splits, prompt formats, the degeneration
metric and the summary (no engine), input errors, and one small run on a real engine (SmolLM2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import run_engine_command
from vllm_griffin.tools import eval_chat as chat
from vllm_griffin.tools import eval_common as quality_eval
from vllm_griffin.tools.cli import main

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = {"fact", "how-to", "list", "explanation", "rewrite", "code", "math"}


def test_prompts_file_is_well_formed():
    prompts = chat.load_prompts()
    assert len(prompts) == 48 and [p["id"] for p in prompts] == list(range(48))
    assert len({p["prompt"] for p in prompts}) == 48
    for p in prompts:
        assert p["split"] == ("tune" if p["id"] < 24 else "heldout")
        assert p["category"] in CATEGORIES
        assert p["prompt"] == p["prompt"].strip() and "\n" not in p["prompt"] and len(p["prompt"].split()) <= 40
    assert sum(len(p["prompt"].split()) < 25 for p in prompts) >= 40
    for half in (prompts[:24], prompts[24:]):  # both splits cover every kind of prompt
        assert {p["category"] for p in half} == CATEGORIES
    # Shipped with the package, not only in a checkout.
    pyproject = (REPO / "pyproject.toml").read_text()  # (tomllib is 3.11+)
    assert "[tool.setuptools.package-data]" in pyproject and "data/*.jsonl" in pyproject
    assert chat.PROMPTS_FILE.parent == Path(chat.__file__).parent / "data"


def test_splits_and_ranges():
    assert [p["id"] for p in chat.select_prompts("tune")] == list(range(24))
    assert [p["id"] for p in chat.select_prompts("heldout")] == list(range(24, 48))
    assert [p["id"] for p in chat.select_prompts("all", 40)] == list(range(40, 48))
    assert [p["id"] for p in chat.select_prompts("heldout", 2, 3)] == [26, 27, 28]
    with pytest.raises(quality_eval.EvalError, match="'dev'.*tune, heldout, all"):
        chat.select_prompts("dev")
    with pytest.raises(quality_eval.EvalError, match="--start 24.*prompts in split tune"):
        chat.select_prompts("tune", 24)


def test_degeneration_metric():
    loop = [1, 2, 3, 4] * 8                      # 29 4-grams, 4 distinct
    assert chat.distinct_ngram_share(loop) == pytest.approx(4 / 29) and chat.is_degenerate(loop)
    fresh = list(range(32))
    assert chat.distinct_ngram_share(fresh) == 1.0 and not chat.is_degenerate(fresh)
    short = [5] * 15                             # a loop, but under 16 tokens: not judged
    assert chat.distinct_ngram_share(short) < 0.5 and not chat.is_degenerate(short)
    assert chat.is_degenerate([5] * 16)
    half = list(range(8)) + [7] * 11             # 16 4-grams, 8 distinct: exactly 0.5 is not under it
    assert chat.distinct_ngram_share(half) == 0.5 and not chat.is_degenerate(half)
    under = list(range(7)) + [6] * 12            # 7 of 16
    assert chat.distinct_ngram_share(under) == 7 / 16 and chat.is_degenerate(under)
    assert chat.distinct_ngram_share([1, 2, 3]) is None and not chat.is_degenerate([1, 2, 3])


class _Plain:
    chat_template = None


def test_prompt_formats(smollm2_dir):
    prompts, kind = chat.format_prompts(_Plain(), ["What is 2+2?"])
    assert kind == "plain" and prompts == ["Question: What is 2+2?\nAnswer:"]
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    prompts, kind = chat.format_prompts(tok, ["What is 2+2?"])
    assert kind == "chat_template"
    text = tok.decode(prompts[0]["prompt_token_ids"])
    assert text == tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert text.rstrip().endswith("assistant") and "What is 2+2?" in text


def test_bad_inputs_name_the_value(capsys):
    base = ["eval", "chat", "--model", "smollm2-135m-instruct"]
    cases = [
        (["--split", "dev"], ["'dev'", "tune, heldout, all"]),
        (["--split", "heldout", "--start", "24"], ["--start 24", "0 <= start < 24"]),
        (["--limit", "-1"], ["--limit -1"]),
        (["--methods", "full,nope"], ["'nope'", "topk"]),
        (["--densities", "0"], ["'0'", "0 < d <= 1"]),
        (["--request-options", '{"method": "random"}'], ["'method'", "--methods"]),
    ]
    for extra, wanted in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert all(w in err for w in wanted), (extra, err)


def _sample(method, density, prompt_id, answer, ids):
    return {"method": method, "density": density, "options": {}, "prompt_id": prompt_id, "category": "fact",
            "prompt": "q", "request_id": "x", "generated_tokens": len(ids), "finish_reason": "length",
            "answer": answer, "distinct_4gram": chat.distinct_ngram_share(ids), "degenerate": chat.is_degenerate(ids),
            "token_ids": " ".join(map(str, ids))}


def test_summary_and_files(tmp_path):
    fresh, loop = list(range(20)), [1, 2] * 10
    samples = [_sample("full", 1.0, 0, "Paris is the capital of France.", fresh),
               _sample("full", 1.0, 1, "", []),
               _sample("topk", 0.5, 0, "Paris is a city a city a city", loop),
               _sample("topk", 0.5, 1, "", [])]
    summary = chat.summarize(samples)
    full, topk = summary[1], summary[0]  # dense sorts last
    assert (full["method"], full["rougeL_vs_full"], full["degenerate"], full["full_degenerate"]) == ("full", 100, 0, 0)
    assert topk["method"] == "topk" and topk["degenerate"] == 1 and topk["degenerate_rate"] == 0.5
    assert topk["full_degenerate"] == 0 and topk["identical_to_full"] == 1  # the two empty answers
    assert 0 < topk["rougeL_vs_full"] < 100
    assert samples[3]["rougeL_vs_full"] == 100.0 and samples[2]["rougeL_vs_full"] < 100
    result = {"model": "m", "prompts": [0, 1], "split": "tune", "max_tokens": 20, "prompt_format": "chat_template",
              "summary": summary, "samples": samples, "runs": []}
    out = tmp_path / "c.json"
    chat.write_outputs(result, out)
    assert "| topk | 0.5 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_chat_on_an_engine(engines, tmp_path, smollm2_dir):
    """Held-out prompts 24-26, 24 greedy tokens, dense + topk at 0.5 on SmolLM2: chat-formatted
    (the dense answer is Hugging Face's greedy answer to the same template), dense agrees with
    itself at 100, and every score recomputes from the stored answers and token ids."""
    out = tmp_path / "c.json"
    cmd = [sys.executable, "-m", "vllm_griffin.tools.cli", "eval", "chat", "--model", "smollm2-135m-instruct",
           "--split", "heldout", "--limit", "3", "--methods", "full,topk", "--densities", "0.5",
           "--max-tokens", "24", "--out", str(out)]
    proc = run_engine_command(engines, cmd, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["prompt_format"] == "chat_template" and result["prompts"] == [24, 26]
    assert result["splits"] == {"tune": [0, 23], "heldout": [24, 47]} and result["split"] == "heldout"
    assert result["runs"][0]["requests"] == 6 and result["runs"][0]["generate_s"] > 0
    samples = result["samples"]
    assert sorted((s["method"], s["prompt_id"]) for s in samples) == sorted(
        (m, i) for m in ("full", "topk") for i in (24, 25, 26))
    dense = {s["prompt_id"]: s for s in samples if s["method"] == "full"}
    for s in samples:
        ids = [int(t) for t in s["token_ids"].split()]
        assert s["answer"] and len(ids) == s["generated_tokens"] and 0 < len(ids) <= 24
        assert s["distinct_4gram"] == pytest.approx(chat.distinct_ngram_share(ids), abs=1e-4)
        assert s["degenerate"] == chat.is_degenerate(ids)
        same = s["answer"] == dense[s["prompt_id"]]["answer"]
        ref = dense[s["prompt_id"]]["answer"]
        want = 100.0 if same else quality_eval.rouge_scores([s["answer"]], [ref])[0]["rougeL"]
        assert s["rougeL_vs_full"] == pytest.approx(want)
    assert all(s["rougeL_vs_full"] == 100.0 for s in dense.values())
    by_cell = {(e["method"], e["density"]): e for e in result["summary"]}
    assert by_cell[("full", 1.0)]["rougeL_vs_full"] == 100.0 and by_cell[("full", 1.0)]["n"] == 3
    topk = by_cell[("topk", 0.5)]
    assert topk["rougeL_vs_full"] == pytest.approx(
        sum(s["rougeL_vs_full"] for s in samples if s["method"] == "topk") / 3)
    assert topk["degenerate"] == sum(s["degenerate"] for s in samples if s["method"] == "topk")
    assert topk["full_degenerate"] == sum(s["degenerate"] for s in dense.values())
    assert "| full | 1 | 100.0 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0

    # Dense is the plain model on the chat template: Hugging Face greedy gives the same tokens.
    import torch
    import transformers

    from tests.conftest import hf_model

    model, tok = hf_model(smollm2_dir), transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    texts = {p["id"]: p["prompt"] for p in chat.select_prompts("heldout", 0, 3)}
    for pid, s in dense.items():
        ids = chat.format_prompts(tok, [texts[pid]])[0][0]["prompt_token_ids"]
        hf = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):]
        assert [int(t) for t in s["token_ids"].split()] == hf.tolist()[: s["generated_tokens"]]
