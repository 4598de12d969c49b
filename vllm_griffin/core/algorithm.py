"""GRIFFIN's selection math (Dong, Chen, Chi, COLM 2024), with no vLLM in sight.

Vocabulary used across the package:

* ``z`` -- the feed-forward activations of one layer, ``act(gate(x)) * up(x)``,
  one row of width ``D`` per token.
* *contribution* of a prompt token -- ``z**2 / ||z||**2``: each token's
  activation pattern normalised to unit length, squared.
* *statistic* -- ``s_j = sqrt(sum_t contribution_tj)`` over all prompt tokens.
  The sum is kept (the sqrt is monotone, so top-k is the same on either);
  chunked prefill adds chunk after chunk into the same sum.
* *experts* -- the ``k = floor(density * D)`` neurons a sequence keeps for
  its whole generation: rows of gate/up and columns of down.
* *gated* (beyond the paper) -- the statistic picks a larger *pool* per sequence;
  each generated token computes its gate on the pool and runs up/down only for
  the neurons whose ``|act(gate)|`` is largest. Same cost as ``topk`` at a density.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

METHODS = ("topk", "magnitude", "random", "sample", "topk_sample", "topk_down", "topk_down_first_dense",
           "topk_magnitude", "gated")
# Methods that read the prompt's statistic (the others never capture).
PROMPT_METHODS = frozenset({"topk", "sample", "topk_sample", "topk_down", "topk_down_first_dense", "topk_magnitude",
                            "gated"})
# Rank the statistic, optionally scaled by the down projection's column norms or
# mixed with the magnitude prior (one batched top-k per k in the engine).
RANK_METHODS = frozenset({"topk", "topk_down", "topk_down_first_dense", "topk_magnitude", "gated"})
# Methods whose tokens pick their own experts, per layer, within the sequence's pool.
TOKEN_GATED = frozenset({"gated"})
# gated: the share of a density's budget spent on the pool's gates. A token computes
# gate rows for the pool (P neurons) and up/down rows for its k experts, so its cost
# is (P + 2k) / 3 neurons' worth; at density d, P = POOL_FACTOR * d (at most all
# neurons) and k takes the rest: the same cost as d * D neurons of topk.
GATED_POOL_FACTOR = 1.5
DOWN_WEIGHTED = frozenset({"topk_down", "topk_down_first_dense"})
# Methods that add the static magnitude score as a prior to the prompt statistic.
PRIOR_MIXED = frozenset({"topk_magnitude"})
# The prior's weight against the prompt's: both are shares summing to 1 per layer, so
# this fixed number means the same on every model (no calibration).
MAGNITUDE_PRIOR_WEIGHT = 0.5
# Refresh (GriffinConfig.refresh): at each refresh the accumulated statistic is
# multiplied by this before the refresh token's contribution (weighted by the
# interval it stands for) is added. 1.0: the statistic over the whole text so far
# (0.5 screened worse on the HumanEval tuning split: docs/quality.md).
REFRESH_DECAY = 1.0
# A method's refresh interval when neither the engine config nor the request sets one.
DEFAULT_REFRESH = {"gated": 4}
# Loop guard (GriffinConfig.loop_guard = n): a generated token whose last n output tokens
# already appeared, in that order, earlier in the output also refreshes. Stale experts make
# small models repeat themselves; a refresh there is a dense token and experts chosen from
# the text as it now is. Each refresh's contribution is weighted by the generated tokens
# it stands for (those since the last refresh), so the fixed schedule alone weighs R.
# Off for every method: on Gemma-3's chat prompts the guard's dense tokens continue a loop
# the sparse ones began (40 % of all tokens ran dense, no fewer loops; docs/quality.md).
DEFAULT_LOOP_GUARD: dict[str, int] = {}
# Methods that move experts between layers (same total, so the same decode cost).
FIRST_LAYER_METHODS = frozenset({"topk_down_first_dense"})


def num_experts(density: float, width: int) -> int:
    """k = floor(density * D), computed as the authors do (``int(D * k_factor)``); at least
    one neuron (a density under 1/D would otherwise leave the MLP out of decoding)."""
    return max(1, int(width * density)) if width > 0 else 0


def layer_seed(seed: int, layer: int) -> int:
    """The random baselines' generator seed for one request seed and layer: a distinct,
    reproducible stream per (seed, layer), independent of the batch."""
    return (seed * 1_000_003 + layer * 7_919 + 12_345) % (2**63 - 1)


def gated_sizes(density: float, width: int) -> tuple[int, int]:
    """(pool, k) of the ``gated`` method at ``density``: the pool the statistic picks per
    sequence and the experts each token keeps in it, costing ``num_experts(density, width)``
    neurons of ``topk``: ``(pool + 2 k) / 3 <= density * width``."""
    budget = num_experts(density, width)
    if budget >= width:
        return width, width
    pool = min(width, int(GATED_POOL_FACTOR * budget))
    k = max(0, min(pool, (3 * budget - pool) // 2))
    return pool, k


def token_scores(gate_act: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """``gated``: what a token ranks its pool by, ``|act(gate)|`` on the pool and -1 elsewhere
    (``gate_act`` [T, D]: the activated gates; ``pool`` [T, D] bool)."""
    return gate_act.float().abs().masked_fill(~pool, -1.0)


def token_experts(gate_act: torch.Tensor, pool: torch.Tensor, k: int) -> torch.Tensor:
    """``gated``: [T, D] bool, each token's ``k`` pool neurons of largest ``|act(gate)|``."""
    idx = torch.topk(token_scores(gate_act, pool), k, dim=-1, sorted=False).indices
    return torch.zeros_like(pool).scatter_(-1, idx, True)


def prompt_contributions(z: torch.Tensor, sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token ``z**2 / ||z||**2`` in float32; rows sum to 1 (0 for an all-zero row).

    ``sq_norms`` ([T, 1], ``||z_t||**2``) is given when ``z`` holds only some of
    the neurons (a tensor-parallel rank's slice): the norm is over all of them.
    """
    sq = z.float().square()
    if sq_norms is None:
        sq_norms = sq.sum(dim=-1, keepdim=True)
    # An all-zero row (possible with ReLU) contributes nothing instead of NaN.
    return sq / sq_norms.clamp_min(torch.finfo(torch.float32).tiny)


def magnitude_scores(w_gate: torch.Tensor, w_up: torch.Tensor | None) -> torch.Tensor:
    """The static baseline's score ``||W_gate[j]|| * ||W_up[j]||`` (``||W_fc1[j]||`` without up)."""
    score = w_gate.float().norm(dim=-1)
    if w_up is not None:
        score = score * w_up.float().norm(dim=-1)
    return score


def down_norms(w_down: torch.Tensor) -> torch.Tensor:
    """``||W_down[:, j]||`` per neuron: how far a unit activation of neuron j moves the layer's output."""
    return w_down.float().norm(dim=0)


def rank_scores(stat_sum: torch.Tensor, method: str, down_norms_sq: torch.Tensor | None = None,
                static_scores: torch.Tensor | None = None) -> torch.Tensor:
    """What a rank method takes the top-k of (rows: one layer of one sequence each).

    * ``topk``: the statistic.
    * ``topk_down*``: ``s_j**2 * ||W_down[:, j]||**2`` -- the prompt's (token-normalised)
      activation mass times the neuron's reach into the output. Same order as ``s_j * ||W_down[:, j]||``.
    * ``topk_magnitude``: ``s_j**2 / sum(s**2) + w * m_j**2 / sum(m**2)`` with ``m`` the
      magnitude baseline's ``||W_gate[j]|| * ||W_up[j]||`` and ``w`` = MAGNITUDE_PRIOR_WEIGHT:
      the neuron's share of the prompt's activation mass plus a smaller share of the
      layer's weight magnitude. The prompt says which neurons this text used; the
      prior keeps neurons with large weights, which a few prompt tokens may not have
      woken but generated tokens can (a strong activation needs large weights).
    """
    if method in DOWN_WEIGHTED:
        return stat_sum * down_norms_sq
    if method in PRIOR_MIXED:
        return _share(stat_sum) + MAGNITUDE_PRIOR_WEIGHT * _share(static_scores.float().square())
    return stat_sum


def _share(x: torch.Tensor) -> torch.Tensor:
    """Each entry's share of its row's sum (rows of zeros stay zero)."""
    return x / x.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def layer_budgets(ks: tuple[int, ...] | list[int], method: str, width: int) -> tuple[int, ...]:
    """Experts per layer for ``method``, keeping ``sum(ks)`` (so the same decode cost).

    ``topk_down_first_dense`` runs the first layer dense (all ``width`` neurons) and
    takes the extra experts evenly from the other layers, as far as each of them
    keeps at least half of its own: the first MLP reacts to token identities more
    than to context, so its prompt statistic predicts later tokens worst, and every
    error it makes passes through all later layers. Other methods keep ``ks``.
    """
    ks = tuple(int(k) for k in ks)
    if method not in FIRST_LAYER_METHODS or len(ks) < 2:
        return ks
    rest = list(ks[1:])
    spare = sum(k - (k + 1) // 2 for k in rest)  # what the others can give, keeping half
    extra = min(width - ks[0], spare)
    # Take from the layer with the most experts first (ties: the deepest), one at a
    # time, so the others stay as even as they were and the total is exact.
    for _ in range(max(0, extra)):
        i = max(range(len(rest)), key=lambda j: (rest[j], j))
        rest[i] -= 1
    return (ks[0] + max(0, extra), *rest)


def select_experts(
    stat_sum: torch.Tensor | None,
    k: int,
    method: str,
    *,
    width: int,
    generator: torch.Generator | None = None,
    static_scores: torch.Tensor | None = None,
    down_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's experts for one sequence, as sorted int64 indices of length ``k``.

    ``stat_sum`` is the summed contributions (``s**2``); ``static_scores`` is
    :func:`magnitude_scores` (``magnitude``, ``topk_magnitude``); ``down_norms`` is
    :func:`down_norms` (``topk_down*``). The sampling methods follow the authors' code:
    probabilities proportional to ``s`` (not ``s**2``), without replacement.
    """
    if not 0 <= k <= width:
        raise ValueError(f"k={k} must lie in [0, {width}]")
    if method in RANK_METHODS:
        sq = down_norms.float().square() if method in DOWN_WEIGHTED else None
        idx = torch.topk(rank_scores(stat_sum, method, sq, static_scores), k).indices
    elif method == "magnitude":
        idx = torch.topk(static_scores, k).indices
    elif method == "random":
        idx = torch.randperm(width, generator=generator, device="cpu")[:k].to(_device_of(stat_sum, static_scores))
    elif method == "sample":
        idx = _sample(_sampling_weights(stat_sum), k, generator)
    elif method == "topk_sample":
        # Half by rank, the rest sampled from the others. The authors take
        # k//2 twice (k-1 experts for odd k); we take k - k//2 so every
        # method keeps exactly k and costs the same.
        top = torch.topk(stat_sum, k // 2).indices
        weights = _sampling_weights(stat_sum)
        weights[top] = 0
        idx = torch.cat([top, _sample(weights, k - k // 2, generator)])
    else:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    return idx.sort().values


def topk_experts_batched(stat_sums: torch.Tensor, k: int) -> torch.Tensor:
    """``select_experts(..., method="topk")`` for several sequences with the same k: [N, k], sorted."""
    return topk_experts_and_masks(stat_sums, k)[0]


def topk_experts_and_masks(stat_sums: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_experts_batched` and the same experts as masks [N, D] bool.

    The ascending order comes from the masks (a scan) rather than from sorting
    the indices, which cost more than the top-k itself at large k.
    """
    idx = torch.topk(stat_sums, k, dim=-1, sorted=False).indices
    masks = torch.zeros(stat_sums.shape, dtype=torch.bool, device=stat_sums.device).scatter_(-1, idx, True)
    return masks.nonzero()[:, -1].view(stat_sums.shape[0], k), masks


def _device_of(*tensors: torch.Tensor | None) -> torch.device:
    for t in tensors:
        if t is not None:
            return t.device
    return torch.device("cpu")


def _sampling_weights(stat_sum: torch.Tensor) -> torch.Tensor:
    # s = sqrt(sum); a floor keeps never-active neurons drawable once the
    # active ones run out, so k is always reachable.
    return stat_sum.float().sqrt().clamp_min(1e-30)


def _sample(weights: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    if n == 0:
        return weights.new_empty(0, dtype=torch.long)
    # Sample on the CPU so a seeded CPU generator gives the same experts on any device.
    idx = torch.multinomial(weights.cpu(), n, replacement=False, generator=generator)
    return idx.to(weights.device)


class RepeatFinder:
    """Finds where an output starts repeating itself: ``repeats(out, g)`` says whether the
    ``n`` tokens ending at output index ``g`` already ended at an earlier index.

    Each n-gram keeps the first index it ended at, so asking again about an index (a
    recompute after preemption) gives the same answer; indexes are read in order, once."""

    def __init__(self, n: int):
        self.n = n
        self.first_end: dict[tuple[int, ...], int] = {}
        self.upto = n - 2  # the last output index read

    def repeats(self, out: Sequence[int], g: int) -> bool:
        n = self.n
        for i in range(self.upto + 1, g + 1):
            self.first_end.setdefault(tuple(int(t) for t in out[i - n + 1: i + 1]), i)
        self.upto = max(self.upto, g)
        if g < n - 1:
            return False
        return self.first_end[tuple(int(t) for t in out[g - n + 1: g + 1])] < g
