"""Decode-time kernels for the experts' MLP: plain-torch references (the tests'
oracle), a C kernel for the CPU, Triton kernels for GPUs, and the dispatch that
picks one per layer and step."""

from vllm_griffin.ops.dispatch import choose_path, kernel_can_win, kernel_supports, union_size
from vllm_griffin.ops.reference import ExpertWeights, experts_mlp_gather, experts_mlp_masked

__all__ = ["choose_path", "kernel_can_win", "kernel_supports", "union_size", "experts_mlp_gather", "experts_mlp_masked", "ExpertWeights"]
