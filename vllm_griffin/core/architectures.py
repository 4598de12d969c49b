"""Where each supported architecture keeps its feed-forward block.

One row per vLLM architecture name; the same :class:`~vllm_griffin.engine.layers.GriffinMLP`
serves them all. Adding a model whose MLP looks like one of these is one line
here plus its parity test (tests/test_architectures.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    layers: str = "model.layers"     # attribute path from the top model to its decoder layers
    # The feed-forward module inside a decoder layer, replaced by a GriffinMLP; None when
    # the layer calls its linears inline (OPT): then the layer's calls are rerouted instead.
    mlp: str | None = "mlp"
    gate_up: str = "gate_up_proj"    # gated: merged [gate; up] column-parallel linear; else fc1
    down: str = "down_proj"          # row-parallel linear back to the hidden size
    act: str = "act_fn"              # gated: act_and_mul, [.., 2D] -> [.., D]; else the activation
    gated: bool = True               # z = act(gate x) * up x, or z = act(fc1 x + b1)
    activation: str = "SiLU"         # for the README's table; the kernels read the module itself


_GATED_SILU = ArchSpec()
_GATED_GELU = ArchSpec(activation="GELU (tanh)")

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _GATED_SILU,
    "MistralForCausalLM": _GATED_SILU,
    "Qwen2ForCausalLM": _GATED_SILU,
    "Qwen3ForCausalLM": _GATED_SILU,
    "GemmaForCausalLM": _GATED_GELU,
    "Gemma2ForCausalLM": _GATED_GELU,
    "Gemma3ForCausalLM": _GATED_GELU,
    "Phi3ForCausalLM": _GATED_SILU,      # vLLM builds it from Llama's layers
    "GraniteForCausalLM": _GATED_SILU,
    "OPTForCausalLM": ArchSpec(layers="model.decoder.layers", mlp=None, gate_up="fc1", down="fc2",
                               act="activation_fn", gated=False, activation="ReLU"),
}


class UnsupportedArchitectureError(ValueError):
    pass


def spec_for(architectures: list[str] | tuple[str, ...] | None) -> tuple[str, ArchSpec]:
    for arch in architectures or ():
        if arch in ARCHITECTURES:
            return arch, ARCHITECTURES[arch]
    raise UnsupportedArchitectureError(
        f"GRIFFIN does not support architecture {list(architectures or [])}; "
        f"supported: {', '.join(sorted(ARCHITECTURES))}")
