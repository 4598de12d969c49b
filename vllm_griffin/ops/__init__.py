"""Decode-time kernels for the experts' MLP: plain-torch references (the tests'
oracle), a C kernel for the CPU, Triton kernels for GPUs, and the dispatch that
picks one per layer and step; plus the prefill capture of the prompt statistic
(capture.py: C kernel on the CPU, torch elsewhere)."""

from vllm_griffin.ops.capture import capture_sq_norms, capture_statistic
from vllm_griffin.ops.dispatch import (
                                      choose_path,
                                      gated_masked_activation_fn,
                                      kernel_can_win,
                                      kernel_supports,
                                      masked_activation_fn,
                                      union_size,
)
from vllm_griffin.ops.reference import ExpertWeights, experts_mlp_gather, experts_mlp_masked

__all__ = ["capture_statistic", "capture_sq_norms", "choose_path", "gated_masked_activation_fn",
           "masked_activation_fn", "kernel_can_win", "kernel_supports", "union_size", "experts_mlp_gather",
           "experts_mlp_masked", "ExpertWeights"]
