"""Tiny random-weight checkpoints, one per supported architecture, saved by
transformers the way a user's checkpoint would be (float32, no tokenizer).

All share one shape: 3 layers, hidden 128, 384 feed-forward neurons, 2 heads of 64
(vLLM's CPU attention needs head sizes of 32 or more), vocabulary 512.
initializer_range 0.2 makes next-token distributions peaked, so greedy tokens are
decided by real margins rather than float noise; biases (OPT) are randomised too,
so the experts' bias entries matter. Gemma 2/3 tie their output to the input
embedding (scaled by sqrt(hidden)); at this init each would just repeat its last
prompt token, so their embedding is shrunk and the final norm sharpened instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=1, vocab_size=512, max_position_embeddings=1024,
              initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs():
    import transformers as tf

    untied = dict(COMMON, tie_word_embeddings=False)
    return {
        "LlamaForCausalLM": (tf.LlamaConfig, untied),
        "MistralForCausalLM": (tf.MistralConfig, dict(untied, sliding_window=None)),
        "Qwen2ForCausalLM": (tf.Qwen2Config, dict(untied, use_sliding_window=False)),
        "Qwen3ForCausalLM": (tf.Qwen3Config, dict(untied, head_dim=64, use_sliding_window=False)),
        "GemmaForCausalLM": (tf.GemmaConfig, dict(COMMON, head_dim=64, hidden_activation="gelu_pytorch_tanh")),
        "Gemma2ForCausalLM": (tf.Gemma2Config, dict(COMMON, head_dim=64, query_pre_attn_scalar=64,
                                                    sliding_window=256)),
        "Gemma3ForCausalLM": (tf.Gemma3TextConfig, dict(COMMON, head_dim=64, query_pre_attn_scalar=64,
                                                        sliding_window=256)),
        "Phi3ForCausalLM": (tf.Phi3Config, dict(untied, sliding_window=None)),
        "GraniteForCausalLM": (tf.GraniteConfig, dict(untied, residual_multiplier=0.5,
                                                      embedding_multiplier=2.0, logits_scaling=1.0)),
        "OPTForCausalLM": (tf.OPTConfig, dict(
            hidden_size=128, ffn_dim=384, num_hidden_layers=3, num_attention_heads=2, vocab_size=512,
            max_position_embeddings=1024, word_embed_proj_dim=128, init_std=0.2, enable_bias=True,
            do_layer_norm_before=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    }


ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
                 "GraniteForCausalLM", "OPTForCausalLM")


def _sharpen_tied_output(model) -> None:
    model.model.embed_tokens.weight.mul_(0.1)
    model.model.norm.weight.fill_(30.0)


POST_INIT = {"Gemma2ForCausalLM": _sharpen_tied_output, "Gemma3ForCausalLM": _sharpen_tied_output}


def save_tiny(arch: str, path: Path) -> Path:
    import transformers

    config_cls, kwargs = _configs()[arch]
    torch.manual_seed(0)
    cfg = config_cls(**kwargs)
    cfg.architectures = [arch]
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.2)
        if arch in POST_INIT:
            POST_INIT[arch](model)
    model.save_pretrained(path)
    return path
