"""GRIFFIN written from the paper's definition on a Hugging Face model, batch size 1.

Independent of the plugin on purpose (no vllm_griffin import): the tests hold
vLLM + plugin to this.

* prefill: full model over the prompt; each layer's FF activations
  z_t = act(gate(x_t)) * up(x_t) (OPT: relu(fc1 x_t)) are the input of the down
  projection (down_proj / fc2).
* statistic: s_j = sqrt(sum_t z_tj^2 / ||z_t||^2), computed in float64.
* experts: top-k of s, k = floor(density * D).
* decode: every later token runs only the experts' gate/up rows and down columns
  (OPT: fc1 rows and bias entries, fc2 columns; fc2's bias whole).

Where the feed-forward block sits is read off the Hugging Face modules
(``gate_proj``/``up_proj``, Phi-3's fused ``gate_up_proj``, OPT's inline
``fc1``/``fc2``), not from the plugin's table.
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


def decoder_layers(model):
    inner = model.model
    return inner.decoder.layers if hasattr(inner, "decoder") else inner.layers


def ffn(layer):
    """(host module, name of its down projection) for a Hugging Face decoder layer."""
    if hasattr(layer, "mlp"):
        return layer.mlp, "down_proj"
    return layer, "fc2"  # OPT: fc1/fc2 inline in the layer


@torch.no_grad()
def griffin_generate(model, prompt_ids: list[int], density: float, max_new_tokens: int) -> OracleResult:
    layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(layers):
        host, down = ffn(layer)
        # [tokens, D] whatever the layer's layout (OPT flattens the batch first).
        hooks.append(getattr(host, down).register_forward_pre_hook(
            lambda mod, args, i=i: captured.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]).clone())))
    try:
        out = model(torch.tensor([prompt_ids]), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    host, down = ffn(layers[0])
    width = getattr(host, down).in_features
    k = int(width * density)
    stats = [statistic_from_activations(captured[i]) for i in range(len(layers))]
    experts = [torch.topk(s, k).indices.sort().values for s in stats]

    originals = [_restrict(layer, idx) for layer, idx in zip(layers, experts)]
    try:
        tokens = [int(out.logits[0, -1].argmax())]
        past = out.past_key_values
        while len(tokens) < max_new_tokens:
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
    finally:
        for layer, saved in zip(layers, originals):
            host, _ = ffn(layer)
            for name, module in saved.items():
                setattr(host, name, module)
    return OracleResult(tokens=tokens, experts=experts, statistic=stats)


def _restrict(layer, idx: torch.Tensor) -> dict:
    """Swap the layer's FF linears for ones holding only the experts; returns the originals."""
    host, down = ffn(layer)
    if hasattr(host, "gate_proj"):
        row_cut = {"gate_proj": idx, "up_proj": idx}
    elif hasattr(host, "gate_up_proj"):  # Phi-3: [gate; up] in one linear
        row_cut = {"gate_up_proj": torch.cat([idx, idx + host.down_proj.in_features])}
    else:
        row_cut = {"fc1": idx}
    saved = {}
    for name, rows in row_cut.items():
        saved[name] = getattr(host, name)
        setattr(host, name, _linear(saved[name].weight[rows], _maybe(saved[name].bias, rows)))
    saved[down] = getattr(host, down)
    setattr(host, down, _linear(saved[down].weight[:, idx], saved[down].bias))
    return saved


def _maybe(bias, rows):
    return None if bias is None else bias[rows]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    lin.weight.data.copy_(weight)
    if bias is not None:
        lin.bias.data.copy_(bias)
    return lin


@torch.no_grad()
def dense_generate(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()
