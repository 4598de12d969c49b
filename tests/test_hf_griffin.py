"""The Hugging Face GRIFFIN used by the quality studies (`eval drift`, the flocking plot and
the screens): the same experts and greedy tokens as the from-the-paper oracle, and its
teacher-forced log-probs consistent with its own greedy decode. No engine."""

from __future__ import annotations

import torch

from tests.oracle import griffin_generate
from tests.tiny_models import save_tiny
from vllm_griffin.tools import hf_griffin
from vllm_griffin.tools.drift import first_divergence


def test_hf_griffin_matches_the_oracle_and_is_self_consistent(tmp_path):
    import transformers

    model_dir = save_tiny("LlamaForCausalLM", tmp_path / "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    weights = hf_griffin.layer_weights(model)
    gen = torch.Generator().manual_seed(0)
    for length in (5, 23):
        prompt = torch.randint(0, model.config.vocab_size, (length,), generator=gen).tolist()
        want = griffin_generate(model, prompt, density=0.5, max_new_tokens=10)
        out, acts = hf_griffin.prefill(model, prompt)
        experts = hf_griffin.select(acts, 0.5, "topk", weights)
        assert [e.sort().values.tolist() for e in experts] == [e.tolist() for e in want.experts]
        dense_tokens, dense_lp = hf_griffin.greedy(model, out, 10)
        with hf_griffin.experts_only(model, experts):
            tokens, lp = hf_griffin.greedy(model, out, 10)
            forced = hf_griffin.teacher_forced(model, out, tokens)
        # GRIFFIN's first token comes from the dense prefill; the rest decode on the experts.
        assert tokens == want.tokens and tokens[0] == dense_tokens[0]
        assert torch.allclose(forced, lp, atol=1e-4) and forced.argmax(-1).tolist() == tokens
        # Outside the block the model is dense again.
        assert hf_griffin.greedy(model, out, 10)[0] == dense_tokens
    assert first_divergence([1, 2, 3], [1, 2, 4]) == 2 and first_divergence([1, 2], [1, 2, 3]) == 2
