"""GRIFFIN on a Hugging Face model, batch size 1, for analysis (no vLLM).

The quality tools that need full next-token distributions or per-token
activations (drift study, flocking heatmap) use this: the engine returns only
top logprobs, and running a study here keeps it off the one-engine-at-a-time
lock. Selection itself is :mod:`vllm_griffin.core.algorithm`, the same code the
engine calls, so every method means the same thing on both sides.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vllm_griffin.core import algorithm


@dataclass
class LayerWeights:
    static_scores: torch.Tensor   # [L, D] magnitude baseline
    down_norms: torch.Tensor      # [L, D] ||W_down[:, j]||


def load_hf_model(path, dtype=torch.float32):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def mlps(model) -> list:
    return [layer.mlp for layer in model.model.layers]


def layer_weights(model) -> LayerWeights:
    ms = mlps(model)
    return LayerWeights(
        static_scores=torch.stack([algorithm.magnitude_scores(m.gate_proj.weight, m.up_proj.weight) for m in ms]),
        down_norms=torch.stack([algorithm.down_norms(m.down_proj.weight) for m in ms]),
    )


@torch.no_grad()
def prefill(model, ids: list[int]):
    """Full forward over the prompt: (output with cache, per-layer activations z [T, D])."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [m.down_proj.register_forward_pre_hook(
        lambda mod, args, i=i: captured.__setitem__(i, args[0][0].detach().float().clone()))
        for i, m in enumerate(mlps(model))]
    try:
        out = model(torch.tensor([ids]), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return out, [captured[i] for i in range(len(captured))]


def select(acts: list[torch.Tensor], density: float, method: str, weights: LayerWeights,
           seed: int = 0) -> list[torch.Tensor]:
    """Every layer's experts for one prompt, as the engine would pick them."""
    width = acts[0].shape[-1]
    stats = torch.stack([algorithm.prompt_contributions(z).sum(0) for z in acts])
    ks = algorithm.layer_budgets([algorithm.num_experts(density, width)] * len(acts), method, width)
    experts = []
    for layer, k in enumerate(ks):
        gen = torch.Generator().manual_seed(algorithm.layer_seed(seed, layer))
        experts.append(algorithm.select_experts(stats[layer], k, method, width=width, generator=gen,
                                                static_scores=weights.static_scores[layer],
                                                down_norms=weights.down_norms[layer]))
    return experts


@contextmanager
def experts_only(model, experts: list[torch.Tensor]) -> Iterator[None]:
    """Within the block, every MLP runs only its experts (rows of gate/up, columns of down)."""
    ms = mlps(model)
    originals = [m.forward for m in ms]
    for m, idx in zip(ms, experts):
        m.forward = _experts_forward(m, idx)
    try:
        yield
    finally:
        for m, fwd in zip(ms, originals):
            m.forward = fwd


def _experts_forward(mlp, idx: torch.Tensor):
    w_gate, w_up, w_down = mlp.gate_proj.weight[idx], mlp.up_proj.weight[idx], mlp.down_proj.weight[:, idx]

    def forward(x):
        return (mlp.act_fn(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()

    return forward


@torch.no_grad()
def greedy(model, out, n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation of ``n`` tokens from a prefill output: (tokens, log-probs [n, V])."""
    past = copy.deepcopy(out.past_key_values)  # the prefill's cache serves several runs
    logits = [out.logits[0, -1].float()]
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < n:
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[0, -1].float())
        tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits).log_softmax(-1)


@torch.no_grad()
def teacher_forced(model, out, tokens: list[int]) -> torch.Tensor:
    """Log-probs [n, V] of the next token at each position of ``tokens`` (fed as given) after the prompt."""
    first = out.logits[0, -1:].float()
    rest = model(torch.tensor([tokens[:-1]]), past_key_values=copy.deepcopy(out.past_key_values),
                 use_cache=True).logits[0].float()
    return torch.cat([first, rest]).log_softmax(-1)
