"""Choose how to run a step's decode rows on their experts.

For now the choice is between the two plain-torch paths by the work they
stream: gathering costs ~3*T*K weight rows, masking ~3*D rows shared by all T.
(Faster kernels and a measured cost model are the decode-speed issue's.)
"""

from __future__ import annotations

import torch

from vllm_griffin.ops.reference import ActAndMul, experts_mlp_gather, experts_mlp_masked


def experts_mlp(x, w_gate_up, w_down_t, experts, counts, act_and_mul: ActAndMul) -> torch.Tensor:
    rows, k = experts.shape
    if rows * k <= w_down_t.shape[0]:
        return experts_mlp_gather(x, w_gate_up, w_down_t, experts, counts, act_and_mul)
    return experts_mlp_masked(x, w_gate_up, w_down_t, experts, counts, act_and_mul)
