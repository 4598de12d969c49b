"""Decode-time kernels for the experts' MLP: plain-torch references (the tests'
oracle) and the dispatch that picks an implementation for a step."""

from vllm_griffin.ops.reference import experts_mlp_gather, experts_mlp_masked
from vllm_griffin.ops.dispatch import experts_mlp

__all__ = ["experts_mlp", "experts_mlp_gather", "experts_mlp_masked"]
