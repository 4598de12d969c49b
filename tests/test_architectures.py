"""Every architecture in vllm_griffin.core.architectures, on a tiny random checkpoint
saved by transformers and served by real vLLM engines (float32, CPU):

* density 1.0 on a GRIFFIN engine == plain vLLM (plugin not loaded): same greedy
  tokens and top-5 logprobs. This checks the pass-through, which is one code path
  per MLP form, so it runs on one architecture of each form (``PLAIN_REFERENCE``:
  gated MLP module, fused gate_up checkpoint, sandwich norms, inline fc1/fc2 with
  biases); the others compare density 1.0 with the Hugging Face model's greedy tokens;
* density 0.5 == the Hugging Face model of that architecture running the paper's
  algorithm (tests/oracle.py): same experts in every layer and same greedy tokens.

Engines one at a time; prompts of 5, 17 and 40 tokens with a 16-token budget, so
prompts are chunked (40 = 16 + 16 + 8).
"""

from __future__ import annotations

import pytest
import torch

from tests.oracle import griffin_generate
from tests.tiny_models import ARCHITECTURES, save_tiny
from vllm_griffin.core.architectures import ARCHITECTURES as SUPPORTED
from vllm_griffin.core.export import read_experts

pytestmark = pytest.mark.slow

LENGTHS = [5, 17, 40]
MAX_TOKENS = 10
# Architectures also compared with a plain vLLM engine (an engine start each).
PLAIN_REFERENCE = ("LlamaForCausalLM", "Phi3ForCausalLM", "Gemma3ForCausalLM", "OPTForCausalLM")


def test_every_supported_architecture_is_tested_here():
    assert sorted(ARCHITECTURES) == sorted(SUPPORTED)


def test_readme_table_lists_exactly_the_supported_architectures():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("<!-- architectures -->")[1].split("<!-- /architectures -->")[0]
    rows = [line.split("|")[1].strip().strip("`") for line in table.strip().splitlines()[2:]]
    assert rows == list(ARCHITECTURES)


def prompts(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=gen).tolist() for n in LENGTHS]


def run(llm, density=None, logprobs=None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"griffin": {"density": density}} if density is not None else None
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, detokenize=False, logprobs=logprobs,
                              extra_args=extra)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts()], sampling, use_tqdm=False)
    return outs


def tokens_and_logprobs(outs):
    return [(list(o.outputs[0].token_ids), [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
            for o in outs]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_parity(arch, engines, tmp_path_factory):
    import transformers

    model_dir = save_tiny(arch, tmp_path_factory.mktemp(arch))
    export_dir = tmp_path_factory.mktemp(f"{arch}-experts")
    common = dict(model=str(model_dir), skip_tokenizer_init=True, max_model_len=256,
                  max_num_batched_tokens=16, max_num_seqs=8)

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    reference = None
    if arch in PLAIN_REFERENCE:
        plain = engines.get(f"{arch}-plain", env={"VLLM_PLUGINS": ""}, **common)
        reference = tokens_and_logprobs(run(plain, logprobs=5))

    griffin = engines.get(f"{arch}-griffin", env={"VLLM_GRIFFIN_EXPORT_DIR": str(export_dir)},
                          additional_config={"griffin": {"density": 0.5, "method": "topk"}}, **common)
    dense = tokens_and_logprobs(run(griffin, density=1.0, logprobs=5))
    if reference is not None:
        assert dense == reference
    else:
        for prompt, (tokens, _) in zip(prompts(), dense):
            assert tokens == griffin_generate(hf, prompt, density=1.0, max_new_tokens=MAX_TOKENS).tokens, arch
    sparse = run(griffin)

    for i, (prompt, out) in enumerate(zip(prompts(), sparse)):
        expected = griffin_generate(hf, prompt, density=0.5, max_new_tokens=MAX_TOKENS)
        experts, meta = read_experts(export_dir / f"{out.request_id}.safetensors")
        assert len(experts) == len(expected.experts) == 3
        for layer, (got, want) in enumerate(zip(experts, expected.experts)):
            assert got.tolist() == want.tolist(), f"{arch}: prompt {i} layer {layer}"
        assert list(out.outputs[0].token_ids) == expected.tokens, f"{arch}: prompt {i} (len {len(prompt)})"
    # GRIFFIN really decoded sparsely: some continuation differs from dense.
    assert any(list(o.outputs[0].token_ids) != ref[0] for o, ref in zip(sparse, dense)), arch
    (stats,) = griffin.collective_rpc("griffin_stats")
    assert stats["slots_in_use"] == 0
