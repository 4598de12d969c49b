"""GRIFFIN inside real vLLM engines on a tiny random Llama (float32, CPU).

Engines: "griffin" (density 0.5, small token budget so prompts are chunked,
expert export on), "plain" (the plugin not loaded at all), "off" (plugin
loaded, no griffin config). Tests are ordered so each engine starts once.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import hf_model
from tests.oracle import griffin_generate
from vllm_griffin.core.export import read_experts, read_statistic

pytestmark = pytest.mark.slow

TOKEN_BUDGET = 16  # max_num_batched_tokens: forces chunked prefill


def make_prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=gen).tolist() for n in lengths]


# 33 = 2 * 16 + 1: run alone, its last prompt chunk is a single token.
ORACLE_LENGTHS = [5, 16, 33, 50]
BATCH_LENGTHS = [3, 9, 17, 33, 40, 12, 64, 25, 7, 48]
BATCH_DENSITIES = [0.5, 0.25, 0.75, 1.0, 0.5, 0.3, 0.9, 0.5, 0.1, 0.6]
BATCH_MAX_TOKENS = [12, 3, 12, 12, 1, 12, 6, 12, 12, 9]


def params(max_tokens=12, density=None, method=None, logprobs=None):
    from vllm import SamplingParams

    griffin = {}
    if density is not None:
        griffin["density"] = density
    if method is not None:
        griffin["method"] = method
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False, logprobs=logprobs,
                          extra_args={"griffin": griffin} if griffin else None)


def tokens_prompt(ids):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=ids)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("experts")


def engine_kwargs(model_dir, **extra):
    return dict(model=str(model_dir), skip_tokenizer_init=True, max_model_len=512,
                max_num_batched_tokens=TOKEN_BUDGET, max_num_seqs=16, **extra)


def get_engine(engines, name, model_dir, export_dir=None):
    if name == "griffin":
        return engines.get("tiny-griffin", env={"VLLM_GRIFFIN_EXPORT_DIR": str(export_dir)},
                           **engine_kwargs(model_dir, additional_config={"griffin": {"density": 0.5, "method": "topk"}}))
    if name == "plain":
        # VLLM_PLUGINS="" loads no general plugin in the engine: vLLM exactly as shipped.
        return engines.get("tiny-plain", env={"VLLM_PLUGINS": ""}, **engine_kwargs(model_dir))
    assert name == "off"
    return engines.get("tiny-off", **engine_kwargs(model_dir))


@pytest.fixture
def griffin(engines, tiny_llama_dir, export_dir):
    return get_engine(engines, "griffin", tiny_llama_dir, export_dir)


_reference_runs: dict[str, list] = {}


def reference_run(engines, name, model_dir, export_dir=None, density=None):
    """Greedy tokens + top-5 logprobs of the batch prompts (memoised per engine)."""
    key = f"{name}-{density}"
    if key not in _reference_runs:
        llm = get_engine(engines, name, model_dir, export_dir)
        prompts = make_prompts(BATCH_LENGTHS)
        outs = generate(llm, prompts, [params(12, density=density, logprobs=5)] * len(prompts))
        _reference_runs[key] = [
            (list(o.outputs[0].token_ids), [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
            for o in outs]
    return _reference_runs[key]


def generate(llm, prompts, sampling):
    if not isinstance(sampling, list):
        sampling = [sampling] * len(prompts)
    outs = llm.generate([tokens_prompt(p) for p in prompts], sampling, use_tqdm=False)
    return outs


def stats(llm):
    (result,) = llm.collective_rpc("griffin_stats")
    assert result["inconsistencies"] == ""  # every look checks the pools against the requests
    return result


# --- griffin engine ------------------------------------------------------------------------

def test_matches_oracle_tokens_and_experts(griffin, tiny_llama_dir, export_dir):
    model = hf_model(tiny_llama_dir)
    for i, prompt in enumerate(make_prompts(ORACLE_LENGTHS)):
        (out,) = generate(griffin, [prompt], params(16))
        expected = griffin_generate(model, prompt, density=0.5, max_new_tokens=16)
        assert list(out.outputs[0].token_ids) == expected.tokens, f"prompt {i} (len {len(prompt)})"
        experts, meta = read_experts(export_dir / f"{out.request_id}.safetensors")
        assert meta["prompt_len"] == str(len(prompt)) and meta["method"] == "topk"
        assert float(meta["density"]) == 0.5
        assert len(experts) == len(expected.experts)
        for layer, (got, want) in enumerate(zip(experts, expected.experts)):
            assert got.dtype == torch.int32 and len(got) == 192
            assert got.tolist() == want.tolist(), f"prompt {i} layer {layer}"
        # The exported statistic is the oracle's (float64 there), squared: the sums selection ranked.
        statistic = read_statistic(export_dir / f"{out.request_id}.safetensors")
        want = torch.stack(expected.statistic).square().float()
        assert statistic.shape == want.shape and torch.allclose(statistic, want, rtol=1e-4, atol=1e-6)


def test_sparse_decode_differs_from_dense(griffin):
    # Guards the oracle test against a plugin that silently runs dense.
    prompt = make_prompts([30], seed=3)
    sparse = generate(griffin, prompt, params(16))[0].outputs[0].token_ids
    dense = generate(griffin, prompt, params(16, density=1.0))[0].outputs[0].token_ids
    assert sparse[0] == dense[0]  # the first token comes from the exact prefill
    assert sparse != dense


def test_batch_equals_alone_with_mixed_densities(griffin):
    prompts = make_prompts(BATCH_LENGTHS, seed=1)
    sampling = [params(m, d) for m, d in zip(BATCH_MAX_TOKENS, BATCH_DENSITIES)]
    alone = [generate(griffin, [p], s)[0].outputs[0].token_ids for p, s in zip(prompts, sampling)]
    batched = [o.outputs[0].token_ids for o in generate(griffin, prompts, sampling)]
    assert batched == alone
    assert [len(t) for t in batched] == BATCH_MAX_TOKENS
    after = stats(griffin)
    assert after["slots_in_use"] == 0
    # Alone, rows decode through the C kernel; together, the dispatch also picked
    # vLLM's dense GEMM with per-row masks: the tokens agree either way.
    assert after["decode_paths"].get("rows", 0) > 0 and after["decode_paths"].get("masked", 0) > 0


def test_methods_run_and_are_reproducible(griffin):
    prompt = make_prompts([20], seed=4)
    for method in ("magnitude", "random", "sample", "topk_sample"):
        first = generate(griffin, prompt, params(8, method=method))[0].outputs[0].token_ids
        again = generate(griffin, prompt, params(8, method=method))[0].outputs[0].token_ids
        assert first == again, method


def test_abort_mid_batch_leaves_others_unchanged(griffin):
    prompts = make_prompts([20, 35, 11, 28], seed=2)
    sampling = params(16)
    alone = [generate(griffin, [p], sampling)[0].outputs[0].token_ids for p in prompts]
    engine = griffin.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(f"abort-test-{i}", tokens_prompt(p), sampling)
    finished = {}
    after_abort = []  # worker state while the other three still run
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        steps += 1
        if steps == 6:
            now = stats(griffin)
            # Mid-decode for some, mid-prompt for others: one slot each, an accumulator per prompt.
            assert now["slots_in_use"] == 4 and now["acc_in_use"] == now["prefilling"]
            engine.abort_request(["abort-test-1"])
        if steps > 6 and len(finished) == 0:
            after_abort.append(stats(griffin))
    assert "abort-test-1" not in finished
    # The worker hears of the abort a step or two later; then its slot is free.
    assert any(s["slots_in_use"] == 3 and not any(r.startswith("abort-test-1") for r in s["requests"])
               for s in after_abort), after_abort
    for i in (0, 2, 3):
        assert list(finished[f"abort-test-{i}"]) == list(alone[i])
    final = stats(griffin)
    assert final["slots_in_use"] == 0 and final["acc_in_use"] == 0 and final["requests_live"] == 0


@pytest.mark.parametrize("extra_args, field", [
    ({"griffin": {"density": 0}}, "density"),
    ({"griffin": {"density": -1}}, "density"),
    ({"griffin": {"density": 1.5}}, "density"),
    ({"griffin": {"density": math.nan}}, "density"),
    ({"griffin": {"density": "abc"}}, "density"),
    ({"griffin": {"method": "bogus"}}, "method"),
    ({"griffin": {"densty": 0.5}}, "densty"),
    ({"griffin_density": 2.0}, "griffin_density"),
    ({"griffin_foo": 1}, "griffin_foo"),
])
def test_bad_request_values_rejected_before_running(griffin, extra_args, field):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    bad = SamplingParams(max_tokens=4, temperature=0.0, detokenize=False, extra_args=extra_args)
    with pytest.raises(VLLMValidationError, match=field) as info:
        generate(griffin, make_prompts([6]), bad)
    assert "allowed:" in str(info.value)
    # The engine is unharmed and nothing was left behind.
    assert len(generate(griffin, make_prompts([6]), params(4))[0].outputs[0].token_ids) == 4
    assert stats(griffin)["slots_in_use"] == 0


def test_density_one_is_plain_vllm(engines, tiny_llama_dir, export_dir):
    griffin_dense = reference_run(engines, "griffin", tiny_llama_dir, export_dir, density=1.0)
    assert griffin_dense == reference_run(engines, "plain", tiny_llama_dir)


def test_plugin_off_is_plain_vllm(engines, tiny_llama_dir):
    plain = reference_run(engines, "plain", tiny_llama_dir)
    off = get_engine(engines, "off", tiny_llama_dir)
    cfg = off.llm_engine.vllm_config
    assert "griffin" not in cfg.parallel_config.worker_cls.lower()
    assert not any("griffin" in k for k in (cfg.additional_config or {}))
    assert reference_run(engines, "off", tiny_llama_dir) == plain
