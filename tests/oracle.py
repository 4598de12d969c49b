"""GRIFFIN written from the paper's definition on a Hugging Face model, batch size 1.

Independent of the plugin on purpose (no vllm_griffin import): the tests hold
vLLM + plugin to this.

* prefill: full model over the prompt; each layer's FF activations
  z_t = act(gate(x_t)) * up(x_t) are the input of down_proj.
* statistic: s_j = sqrt(sum_t z_tj^2 / ||z_t||^2), computed in float64.
* experts: top-k of s, k = floor(density * D).
* decode: every later token runs only the experts' gate/up rows and down columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class OracleResult:
    tokens: list[int]
    experts: list[torch.Tensor]       # per layer, sorted int64
    statistic: list[torch.Tensor]     # per layer, float64 s_j


def statistic_from_activations(z: torch.Tensor) -> torch.Tensor:
    sq = z.double().square()
    norms = sq.sum(-1, keepdim=True)
    # A token whose activations are all zero (possible with ReLU) adds nothing.
    return torch.where(norms > 0, sq / norms, torch.zeros_like(sq)).sum(0).sqrt()


@torch.no_grad()
def griffin_generate(model, prompt_ids: list[int], density: float, max_new_tokens: int) -> OracleResult:
    layers = model.model.layers
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, i=i: captured.__setitem__(i, args[0][0].detach().clone()))
        for i, layer in enumerate(layers)
    ]
    try:
        out = model(torch.tensor([prompt_ids]), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    width = layers[0].mlp.down_proj.in_features
    k = int(width * density)
    stats = [statistic_from_activations(captured[i]) for i in range(len(layers))]
    experts = [torch.topk(s, k).indices.sort().values for s in stats]

    originals = [layer.mlp.forward for layer in layers]
    for layer, idx in zip(layers, experts):
        layer.mlp.forward = _experts_forward(layer.mlp, idx)
    try:
        tokens = [int(out.logits[0, -1].argmax())]
        past = out.past_key_values
        while len(tokens) < max_new_tokens:
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
    finally:
        for layer, fwd in zip(layers, originals):
            layer.mlp.forward = fwd
    return OracleResult(tokens=tokens, experts=experts, statistic=stats)


def _experts_forward(mlp, idx: torch.Tensor):
    w_gate = mlp.gate_proj.weight[idx]
    w_up = mlp.up_proj.weight[idx]
    w_down = mlp.down_proj.weight[:, idx]

    def forward(x):
        return (mlp.act_fn(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()

    return forward


@torch.no_grad()
def dense_generate(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()
