"""GRIFFIN with torch.compile (enforce_eager=False): vLLM traces the model once,
so all per-step logic must live behind the griffin_mlp custom op."""

from __future__ import annotations

import pytest

from tests.conftest import hf_model
from tests.oracle import griffin_generate
from tests.test_engine_tiny import make_prompts, params, tokens_prompt

pytestmark = pytest.mark.slow


def test_compiled_engine_matches_oracle(engines, tiny_llama_dir):
    llm = engines.get("tiny-griffin-compiled", model=str(tiny_llama_dir), skip_tokenizer_init=True,
                      max_model_len=512, max_num_batched_tokens=16, max_num_seqs=8, enforce_eager=False,
                      additional_config={"griffin": {"density": 0.5, "method": "topk"}})
    assert llm.llm_engine.vllm_config.compilation_config.mode != 0
    model = hf_model(tiny_llama_dir)
    prompts = make_prompts([5, 33, 21, 12], seed=7)
    outs = llm.generate([tokens_prompt(p) for p in prompts], params(12), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == griffin_generate(model, prompt, 0.5, 12).tokens
