"""GRIFFIN on real trained weights against the oracle (float32): SmolLM2-135M-Instruct
(Llama architecture), Gemma-3-270M (Gemma3) and Qwen2.5-Coder-0.5B-Instruct (Qwen2),
the embedded models; the paper's topk, and the `gated` method and refreshes beyond it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import hf_model
from tests.oracle import griffin_generate, griffin_generate_variant
from vllm_griffin.core.export import read_experts

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "xsum_1shot_dev.jsonl"
MAX_TOKENS = 24
LAYERS = {"smollm2-135m-instruct": 30, "gemma-3-270m": 18, "qwen2.5-coder-0.5b-instruct": 24}
# Beyond the paper, per request in the same engines: (method, refresh, loop guard), checked in
# batches and alone. A guard of 3 fires on these short texts (small models repeat at 0.5).
VARIANTS = (("gated", 0, 0), ("topk", 4, 0), ("topk", 0, 3), ("gated", 5, 0))


def prompts(tokenizer):
    texts = [
        "The capital of France is",
        "Write a haiku about the sea.",
        "Explain in one sentence why the sky is blue.",
    ]
    if tokenizer.chat_template is None:  # Gemma-3-270M's GGUF carries no chat template: plain text
        ids = [tokenizer(t)["input_ids"] for t in texts]
    else:  # the template writes any BOS itself
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts[1:]]
        ids = [tokenizer(texts[0])["input_ids"]] + [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats]
    if DATA.exists():  # a real XSum 1-shot prompt, truncated to keep the test quick
        article = json.loads(DATA.read_text().splitlines()[0])["article"]
        ids.append(tokenizer(article)["input_ids"][-300:])
    return ids


# Teacher-forced on the engine's tokens, the oracle's logit for each is within a few tenths
# of its top logit: float32 summation order flips near-ties among the thousands of gates
# `gated` ranks per token, and the flips add up over the tokens' KV. Measured over these
# prompts: 0 on SmolLM2 and Gemma-3; on Qwen at most 0.5, once 1.14 (an AVX2 machine), and
# twice over 0.5 in one text on an AVX-512 machine, whose oneDNN kernels sum in another order.
# Another method's texts (topk's oracle on gated's tokens) fall 2-12 below at several tokens
# of every text.
REGRET_NEAR, REGRET_MAX, NEAR_ALLOWED = 0.5, 2.0, 2


def answer_length(tokenizer, tokens: list[int]) -> int:
    """Tokens up to and including the first end-of-text: the answer (the tests ignore EOS,
    and past it a model's logits are out-of-distribution, full of near-ties)."""
    stops = {tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
                                        if t in tokenizer.get_vocab()}
    return next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))


def assert_greedy_under_oracle(want, what: str, tokenizer, tokens: list[int]) -> None:
    regrets = want.regrets[: answer_length(tokenizer, tokens)]
    worst = max(range(len(regrets)), key=regrets.__getitem__)
    text = tokenizer.decode(tokens)
    assert regrets[worst] < REGRET_MAX, (
        f"{what}: token {worst} is {regrets[worst]:.2f} below the oracle's best: {text!r}")
    off = [i for i, r in enumerate(regrets) if r >= REGRET_NEAR]
    assert len(off) <= NEAR_ALLOWED, f"{what}: tokens {off} are >= {REGRET_NEAR} below the oracle's best: {text!r}"


@pytest.mark.parametrize("name", list(LAYERS))
def test_trained_model_matches_oracle(engines, name, tmp_path_factory):
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_griffin.tools.models import prepare_model

    model_dir = prepare_model(name)
    export_dir = tmp_path_factory.mktemp(f"{name}-experts")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = engines.get(f"{name}-griffin", env={"VLLM_GRIFFIN_EXPORT_DIR": str(export_dir)},
                      model=str(model_dir), max_model_len=1024, max_num_batched_tokens=64, max_num_seqs=8,
                      additional_config={"griffin": {"density": 0.5, "method": "topk"}})
    model = hf_model(model_dir)
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    batch = prompts(tokenizer)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], sampling, use_tqdm=False)
    dense = llm.generate([TokensPrompt(prompt_token_ids=batch[0])],
                         SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                        extra_args={"griffin": {"density": 1.0}}), use_tqdm=False)
    for i, (prompt, out) in enumerate(zip(batch, outs)):
        expected = griffin_generate(model, prompt, density=0.5, max_new_tokens=MAX_TOKENS)
        experts, _ = read_experts(export_dir / f"{out.request_id}.safetensors")
        assert len(experts) == LAYERS[name]
        flipped = 0
        for layer, (got, want) in enumerate(zip(experts, expected.experts)):
            if got.tolist() != want.tolist():
                # Only a float near-tie at the top-k edge may differ: the engine sums in float32
                # (in its kernels' lane order), the oracle in float64.
                stat = expected.statistic[layer]
                edge = stat[want.long()].min()
                swapped = set(got.tolist()) ^ set(want.tolist())
                assert len(swapped) <= 4 and all(abs(stat[j] - edge) <= 1e-5 * edge for j in swapped), \
                    f"prompt {i} layer {layer}: {sorted(swapped)}"
                flipped += 1
        assert flipped <= 1, f"prompt {i}: {flipped} layers differ"
        if not flipped:  # a flipped neuron changes the decode: the tokens are the oracle's only without one
            assert list(out.outputs[0].token_ids) == expected.tokens, \
                f"{name} prompt {i}: {tokenizer.decode(expected.tokens)!r}"
    assert list(dense[0].outputs[0].token_ids) != list(outs[0].outputs[0].token_ids)
    # gated and refreshes: each of the engine's tokens is the oracle's greedy choice up to
    # float near-ties (the oracle, teacher-forced on them, picks per token from HF's own gate
    # outputs and recomputes the statistic in float64).
    for method, refresh, guard in VARIANTS:
        options = {"density": 0.5, "method": method, "refresh": refresh, "loop_guard": guard}
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                extra_args={"griffin": options})
        # The whole batch once (four rows a step: vLLM's GEMMs with per-row masks, or the
        # gated kernel in union order), else two rows; alone, one row a step (the gated kernel).
        together = batch if refresh == guard == 0 else batch[:2]
        got = llm.generate([TokensPrompt(prompt_token_ids=p) for p in together], params, use_tqdm=False)
        got += llm.generate([TokensPrompt(prompt_token_ids=batch[1])], params, use_tqdm=False)
        for i, (prompt, out) in enumerate(zip(together + batch[1:2], got)):
            tokens = list(out.outputs[0].token_ids)
            want = griffin_generate_variant(model, prompt, 0.5, MAX_TOKENS, method=method, refresh=refresh,
                                            loop_guard=guard,
                                            forced=tokens)
            assert_greedy_under_oracle(want, f"{name} {options} prompt {i}", tokenizer, tokens)
    # The check can fail: the last variant's texts (gated, refresh 5) are not all greedy
    # under the paper's topk. Checked on one model: the oracle runs are the test's cost.
    if name == "smollm2-135m-instruct":
        failed = 0
        for prompt, out in zip(together + batch[1:2], got):
            tokens = list(out.outputs[0].token_ids)
            try:
                assert_greedy_under_oracle(griffin_generate_variant(model, prompt, 0.5, MAX_TOKENS, forced=tokens),
                                           "gated under topk", tokenizer, tokens)
            except AssertionError:
                failed += 1
        assert failed > 0
    stats = llm.collective_rpc("griffin_stats")[0]
    assert stats["refresh_tokens"] >= 2 * (MAX_TOKENS - 2) // 4  # refreshes happened
    assert stats["loop_guard_tokens"] > 0  # and the loop guard's
    paths = stats["decode_paths"]
    assert paths.get("gated_rows", 0) > 0 and paths.get("masked", 0) + paths.get("gated_union", 0) > 0, paths
