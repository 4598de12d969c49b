"""Where each supported architecture keeps its feed-forward block.

One row per vLLM architecture name; the same :class:`~vllm_griffin.layers.GriffinMLP`
serves them all. Adding a gated-MLP model is usually one line here plus its
parity test.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    layers: str = "model.layers"     # attribute path from the top model to its decoder layers
    mlp: str = "mlp"                 # the feed-forward module inside a decoder layer
    gate_up: str = "gate_up_proj"    # merged [gate; up] column-parallel linear
    down: str = "down_proj"          # row-parallel linear
    act: str = "act_fn"              # act_and_mul module: [.., 2D] -> [.., D]


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(),
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
