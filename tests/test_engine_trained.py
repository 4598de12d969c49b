"""GRIFFIN on real trained weights against the oracle (float32): SmolLM2-135M-Instruct
(Llama architecture) and Gemma-3-270M (Gemma3), the embedded models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import hf_model
from tests.oracle import griffin_generate
from vllm_griffin.export import read_experts

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "xsum_1shot_dev.jsonl"
MAX_TOKENS = 24
LAYERS = {"smollm2-135m-instruct": 30, "gemma-3-270m": 18}


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


@pytest.mark.parametrize("name", list(LAYERS))
def test_trained_model_matches_oracle(engines, name, tmp_path_factory):
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_griffin.models import prepare_model

    model_dir = prepare_model(name)
    export_dir = tmp_path_factory.mktemp(f"{name}-experts")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = engines.get(f"{name}-griffin", env={"VLLM_GRIFFIN_EXPORT_DIR": str(export_dir)},
                      model=str(model_dir), max_model_len=1024, max_num_batched_tokens=64, max_num_seqs=8,
                      additional_config={"griffin": {"density": 0.5}})
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
        for layer, (got, want) in enumerate(zip(experts, expected.experts)):
            assert got.tolist() == want.tolist(), f"prompt {i} layer {layer}"
        assert list(out.outputs[0].token_ids) == expected.tokens, f"{name} prompt {i}: {tokenizer.decode(expected.tokens)!r}"
    assert list(dense[0].outputs[0].token_ids) != list(outs[0].outputs[0].token_ids)
