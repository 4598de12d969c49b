"""The selection math and the decode references, on plain tensors (no engine)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.oracle import statistic_from_activations
from vllm_griffin.core import algorithm
from vllm_griffin.ops import ExpertWeights, experts_mlp_gather, experts_mlp_masked


def silu_and_mul(x):
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def test_num_experts_is_floor_like_the_authors():
    assert algorithm.num_experts(0.5, 1536) == 768
    assert algorithm.num_experts(0.29, 100) == int(100 * 0.29)
    assert algorithm.num_experts(1.0, 7) == 7
    assert algorithm.num_experts(5e-324, 4864) == 1 and algorithm.num_experts(0.1, 5) == 1  # never none


def test_contributions_sum_to_statistic():
    z = torch.randn(37, 64)
    z[5] = 0  # an all-zero row contributes nothing, not NaN
    contrib = algorithm.prompt_contributions(z)
    assert torch.isfinite(contrib).all()
    assert torch.allclose(contrib.sum(-1)[torch.arange(37) != 5], torch.ones(36))
    # Chunked accumulation equals the one-shot definition.
    chunked = sum(algorithm.prompt_contributions(c).double().sum(0) for c in z.split(10))
    assert torch.allclose(chunked.sqrt(), statistic_from_activations(z), atol=1e-6)


@pytest.mark.parametrize("method", algorithm.METHODS)
@pytest.mark.parametrize("k", [0, 1, 7, 32, 64])
def test_every_method_returns_k_sorted_distinct_indices(method, k):
    width = 64
    stat = torch.rand(width)
    stat[:10] = 0  # never-active neurons must not break the samplers
    gen = torch.Generator().manual_seed(1)
    idx = algorithm.select_experts(stat, k, method, width=width, generator=gen, static_scores=torch.rand(width),
                                   down_norms=torch.rand(width))
    assert idx.dtype == torch.long and len(idx) == k
    assert idx.tolist() == sorted(set(idx.tolist()))
    assert all(0 <= i < width for i in idx.tolist())


def test_topk_picks_the_largest_statistic():
    stat = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2])
    assert algorithm.select_experts(stat, 2, "topk", width=5).tolist() == [1, 3]
    batched = algorithm.topk_experts_batched(torch.stack([stat, stat.flip(0)]), 2)
    assert batched.tolist() == [[1, 3], [1, 3]]


def test_topk_sample_keeps_the_top_half():
    stat = torch.arange(100, dtype=torch.float32)
    idx = algorithm.select_experts(stat, 10, "topk_sample", width=100, generator=torch.Generator().manual_seed(0))
    assert set(range(95, 100)) <= set(idx.tolist())


def test_magnitude_scores_and_seeded_methods_are_reproducible():
    w = torch.randn(8, 4)
    assert torch.allclose(algorithm.magnitude_scores(w[:4], w[4:]), w[:4].norm(dim=-1) * w[4:].norm(dim=-1))
    stat = torch.rand(50)
    for method in ("random", "sample", "topk_sample"):
        a = algorithm.select_experts(stat, 20, method, width=50, generator=torch.Generator().manual_seed(3))
        b = algorithm.select_experts(stat, 20, method, width=50, generator=torch.Generator().manual_seed(3))
        assert a.tolist() == b.tolist()


def test_unknown_method_and_bad_k_are_rejected():
    with pytest.raises(ValueError, match="bogus"):
        algorithm.select_experts(torch.rand(4), 2, "bogus", width=4)
    with pytest.raises(ValueError, match="k=5"):
        algorithm.select_experts(torch.rand(4), 5, "topk", width=4)


def naive_experts_mlp(x, w_gate_up, w_down_t, experts, counts):
    """One row at a time, straight from the definition."""
    width = w_down_t.shape[0]
    rows = []
    for t in range(x.shape[0]):
        idx = experts[t, : counts[t]]
        g = w_gate_up[idx] @ x[t]
        u = w_gate_up[idx + width] @ x[t]
        rows.append((F.silu(g) * u) @ w_down_t[idx])
    return torch.stack(rows)


@pytest.mark.parametrize("rows, width, counts", [
    (1, 48, [24]),
    (3, 48, [5, 0, 47]),     # k = 0 gives a zero MLP; odd k
    (9, 32, [16] * 9),       # enough rows for the dispatch to pick the masked path
])
def test_decode_paths_equal_the_definition(rows, width, counts):
    torch.manual_seed(0)
    hidden = 16
    x = torch.randn(rows, hidden, dtype=torch.float64)
    w_gate_up = torch.randn(2 * width, hidden, dtype=torch.float64)
    w_down_t = torch.randn(width, hidden, dtype=torch.float64)
    kmax = max(counts)
    experts = torch.stack([torch.randperm(width)[:kmax] for _ in range(rows)])
    # Stale entries past a row's count repeat its real experts (as a reused slot can).
    for t, c in enumerate(counts):
        if 0 < c < kmax:
            experts[t, c:] = experts[t, 0]
    counts = torch.tensor(counts)
    want = naive_experts_mlp(x, w_gate_up, w_down_t, experts, counts)
    for fn in (experts_mlp_gather, experts_mlp_masked):
        got = fn(x, ExpertWeights.separate(w_gate_up, w_down_t), experts, counts, silu_and_mul)
        assert torch.allclose(got, want, atol=1e-9), fn.__name__


# -- selection improvements (topk_down, topk_down_first_dense) --------------------------------


def test_topk_down_ranks_statistic_times_down_column_norm():
    # s = sqrt(stat): [0.9, 0.8, 0.3]; down norms [0.1, 1.0, 4.0] -> s*||d|| = [0.09, 0.8, 1.2]
    stat = torch.tensor([0.81, 0.64, 0.09])
    w_down = torch.zeros(5, 3)
    w_down[0, 0], w_down[:, 1], w_down[:4, 2] = 0.1, torch.tensor([0.6, 0.8, 0, 0, 0]), 2.0
    norms = algorithm.down_norms(w_down)
    assert torch.allclose(norms, torch.tensor([0.1, 1.0, 4.0]))
    assert algorithm.select_experts(stat, 2, "topk", width=3).tolist() == [0, 1]
    assert algorithm.select_experts(stat, 2, "topk_down", width=3, down_norms=norms).tolist() == [1, 2]
    # The batched path (the engine's) ranks the same scores.
    scores = algorithm.rank_scores(stat[None], "topk_down", norms.square()[None])
    assert algorithm.topk_experts_batched(scores, 2).tolist() == [[1, 2]]
    # Equal down norms: the paper's top-k exactly.
    assert algorithm.select_experts(stat, 2, "topk_down", width=3, down_norms=torch.ones(3)).tolist() == [0, 1]


@pytest.mark.parametrize("ks,width", [((768,) * 30, 1536), ((512,) * 18, 2048), ((384,) * 30, 1536),
                                      ((76,) * 30, 1536), ((1200,) * 4, 1536), ((3, 5, 1, 0), 8)])
def test_first_dense_budget_keeps_the_total(ks, width):
    out = algorithm.layer_budgets(ks, "topk_down_first_dense", width)
    assert sum(out) == sum(ks) and len(out) == len(ks)
    assert all(0 <= k <= width for k in out)
    # The first layer grows until it is dense or the others are down to half of theirs.
    assert out[0] == width or all(o == (k + 1) // 2 for o, k in zip(out[1:], ks[1:]))
    assert all(o >= (k + 1) // 2 for o, k in zip(out[1:], ks[1:]))
    # Taken evenly: the others differ by at most one more than before.
    assert max(out[1:]) - min(out[1:]) <= max(ks[1:]) - min(ks[1:]) + 1
    for method in ("topk", "topk_down", "magnitude", "random"):
        assert algorithm.layer_budgets(ks, method, width) == tuple(ks)


def test_first_dense_budget_examples():
    # 4 layers of 10 out of 16: layer 0 dense (16), the 6 extra taken two per layer.
    assert algorithm.layer_budgets((10, 10, 10, 10), "topk_down_first_dense", 16) == (16, 8, 8, 8)
    # Too little budget for a dense first layer: the others keep half (2 of 4).
    assert algorithm.layer_budgets((4, 4, 4), "topk_down_first_dense", 16) == (8, 2, 2)
    assert algorithm.layer_budgets((5, 4, 3), "topk_down_first_dense", 16) == (8, 2, 2)


# -- topk_magnitude: the prompt statistic plus a weight-magnitude prior -----------------------


def test_topk_magnitude_ranks_prompt_share_plus_half_the_magnitude_share():
    # Prompt shares [0.5, 0.3, 0.2, 0]; magnitude**2 shares [0.05, 0.05, 0.1, 0.8].
    stat = torch.tensor([5.0, 3.0, 2.0, 0.0])
    magnitude = torch.tensor([0.5, 0.5, 1.0, 8.0]).sqrt()
    w = algorithm.MAGNITUDE_PRIOR_WEIGHT
    want = torch.tensor([0.5, 0.3, 0.2, 0.0]) + w * torch.tensor([0.05, 0.05, 0.1, 0.8])
    got = algorithm.rank_scores(stat, "topk_magnitude", static_scores=magnitude)
    assert torch.allclose(got, want)
    # A neuron the prompt never woke but with by far the largest weights gets in
    # (w = 0.5: scores [0.525, 0.325, 0.25, 0.4], so k = 2 takes neurons 0 and 3).
    assert algorithm.select_experts(stat, 2, "topk", width=4).tolist() == [0, 1]
    assert algorithm.select_experts(stat, 2, "topk_magnitude", width=4, static_scores=magnitude).tolist() == [0, 3]
    # The engine's batched path ranks the same scores.
    scores = algorithm.rank_scores(stat[None], "topk_magnitude", static_scores=magnitude[None])
    assert algorithm.topk_experts_batched(scores, 2).tolist() == [[0, 3]]


def test_topk_magnitude_is_scale_free_and_is_topk_under_a_flat_prior():
    gen = torch.Generator().manual_seed(0)
    stat, magnitude = torch.rand(3, 64, generator=gen), torch.rand(3, 64, generator=gen)
    base = algorithm.topk_experts_batched(algorithm.rank_scores(stat, "topk_magnitude", static_scores=magnitude), 20)
    # Longer prompts (a larger sum) and rescaled weights mean the same mix: no model constant.
    for s, m in ((stat * 37.0, magnitude), (stat, magnitude * 1e-3), (stat * 1e3, magnitude * 5.0)):
        got = algorithm.topk_experts_batched(algorithm.rank_scores(s, "topk_magnitude", static_scores=m), 20)
        assert torch.equal(got, base)
    # Equal magnitudes add the same amount to every neuron: the paper's top-k.
    flat = algorithm.rank_scores(stat, "topk_magnitude", static_scores=torch.ones(3, 64))
    assert torch.equal(algorithm.topk_experts_batched(flat, 20), algorithm.topk_experts_batched(stat, 20))
    # A prompt with no activity at all (all-zero statistic) falls back to the magnitude baseline.
    zero = algorithm.rank_scores(torch.zeros(64), "topk_magnitude", static_scores=magnitude[0])
    assert torch.isfinite(zero).all()
    assert torch.equal(torch.topk(zero, 20).indices.sort().values,
                       algorithm.select_experts(None, 20, "magnitude", width=64, static_scores=magnitude[0]))


def test_engine_state_selects_topk_magnitude_like_the_definition():
    """GriffinState (the engine's per-request tables, no engine) picks the same experts as
    select_experts for topk_magnitude, next to a topk request on the same prompt in one batch."""
    from tests.oracle import statistic_from_activations
    from vllm_griffin.core.config import GriffinConfig
    from vllm_griffin.core.state import GriffinState, StepRow

    layers, width = 2, 16
    state = GriffinState(GriffinConfig(method="topk"), layers, width, torch.device("cpu"), max_seqs=4)
    gen = torch.Generator().manual_seed(0)
    state.static_scores.copy_(torch.rand(layers, width, generator=gen) + 0.5)
    state.static_scores[:, 3] = 20.0  # neuron 3: huge weights, never active in the prompt
    z = torch.randn(9, width, generator=gen)
    z[:, 3] = 0
    rows = [StepRow("mag", 9, 0, 9, {"griffin_method": "topk_magnitude"}), StepRow("paper", 9, 0, 9)]
    plan = state.plan_step(rows)
    dense = torch.cat([z, z])
    for layer in range(layers):
        state.capture(layer, dense * (layer + 1), plan)
    state.finish_step(plan)
    for layer in range(layers):
        stat = statistic_from_activations(z * (layer + 1)).square()
        want = algorithm.select_experts(stat, width // 2, "topk_magnitude", width=width,
                                        static_scores=state.static_scores[layer])
        assert state.experts_of("mag")[layer].tolist() == want.tolist()
        assert 3 in want.tolist()
        paper = algorithm.select_experts(stat, width // 2, "topk", width=width)
        assert state.experts_of("paper")[layer].tolist() == paper.tolist() and 3 not in paper.tolist()


def test_topk_magnitude_under_tensor_parallelism_is_the_single_device_choice():
    """Two ranks with half the neurons each (in-process collectives): the global selection
    mixes the whole layer's prior, so the ranks together keep the one-device experts."""
    from tests.oracle import statistic_from_activations
    from tests.test_state_tp import LAYERS, RANKS, WIDTH, make_ranks, prefill

    gen = torch.Generator().manual_seed(1)
    z = torch.randn(7, WIDTH, generator=gen)
    magnitude = torch.rand(LAYERS, WIDTH, generator=gen) + 0.5
    magnitude[:, 1] = 30.0  # rank 0's neuron 1: large weights, silent prompt
    z[:, 1] = 0
    z[:, WIDTH // RANKS:] *= 3  # rank 1's neurons dominate the statistic: uneven counts per rank
    states = make_ranks("global", density=0.5, method="topk_magnitude")
    half = WIDTH // RANKS
    for rank, state in enumerate(states):
        state.static_scores.copy_(magnitude[:, rank * half:(rank + 1) * half])
    per_rank = prefill(states, z)
    for layer in range(LAYERS):
        stat = statistic_from_activations(z * (layer + 1)).square()
        want = algorithm.select_experts(stat, WIDTH // 2, "topk_magnitude", width=WIDTH,
                                        static_scores=magnitude[layer])
        got = torch.cat([per_rank[r][layer] for r in range(RANKS)]).sort().values
        assert got.tolist() == want.tolist() and 1 in got.tolist()


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.6, 2 / 3, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("width", [7, 96, 4864])
def test_gated_sizes_cost_no_more_than_topk(density, width):
    """A gated token computes gates for its pool and up/down for k experts: (pool + 2k)/3
    neurons' worth, within topk's floor(density * D); the pool is 1.5x that budget."""
    pool, k = algorithm.gated_sizes(density, width)
    budget = algorithm.num_experts(density, width)
    assert 0 <= k <= pool <= width
    assert pool + 2 * k <= 3 * budget
    if budget < width:
        assert pool == min(width, int(1.5 * budget))
        assert pool + 2 * k >= 3 * budget - 2  # all of the budget, but for rounding
    else:
        assert (pool, k) == (width, width)


def test_token_experts_keep_the_largest_gates_within_the_pool():
    gate_act = torch.tensor([[5.0, -9.0, 1.0, 3.0, 0.5], [0.0, 2.0, -1.5, 0.1, 4.0]])
    pool = torch.tensor([[True, True, True, False, True], [False, True, True, True, True]])
    keep = algorithm.token_experts(gate_act, pool, 2)
    # |act| ranks (row 0: -9 and 5; neuron 3 is outside the pool), per row.
    assert keep.tolist() == [[True, True, False, False, False], [False, True, False, False, True]]
    assert algorithm.token_experts(gate_act, pool, 0).sum() == 0


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampling_baselines_draw_in_proportion_to_the_statistic():
    """`sample` draws without replacement with probability proportional to s = sqrt(stat);
    `topk_sample` keeps the top k - k//2 by rank and draws the rest the same way from the
    others. Chi-square over many seeded draws (critical value for 5 degrees of freedom at
    p = 0.001: 20.5); a uniform draw scores in the thousands here."""
    stat = torch.tensor([1.0, 4.0, 9.0, 16.0, 25.0, 36.0])  # s = 1..6
    draws = 6000
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    for _ in range(draws):
        counts[algorithm.select_experts(stat, 1, "sample", width=6, generator=gen)] += 1
    s = stat.sqrt()
    assert _chi_square(counts, s / s.sum()) < 20.5
    assert _chi_square(counts, torch.full((6,), 1 / 6)) > 200  # the test can tell uniform apart
    # topk_sample, k = 2: neuron 5 by rank, the other drawn from 0..4 in proportion to s.
    counts = torch.zeros(6)
    for _ in range(draws):
        idx = algorithm.select_experts(stat, 2, "topk_sample", width=6, generator=gen)
        assert 5 in idx.tolist()
        counts[idx] += 1
    rest = s[:5] / s[:5].sum()
    assert _chi_square(counts[:5], rest) < 18.5  # 4 degrees of freedom, p = 0.001


def test_request_seed_changes_and_fixes_a_sampled_draw():
    from vllm_griffin.core.config import GriffinConfig
    from vllm_griffin.core.state import GriffinState, StepRow

    z = torch.randn(12, 32, generator=torch.Generator().manual_seed(5))

    def experts(seed, method="sample"):
        state = GriffinState(GriffinConfig(method=method, seed=9), 2, 32, torch.device("cpu"), max_seqs=2)
        plan = state.plan_step([StepRow("a", 12, 0, 12, seed=seed)])
        for layer in range(2):
            if plan.capture_pos is not None:  # as GriffinMLP: `random` captures nothing
                state.capture(layer, z, plan)
        state.finish_step(plan)
        return [e.tolist() for e in state.experts_of("a")]

    for method in ("sample", "topk_sample", "random"):
        first = experts(1, method)
        assert experts(1, method) == first, method               # the seed fixes the draw
        assert experts(2, method) != first, method               # another seed, another draw
        assert experts(None, method) == experts(9, method), method  # no request seed: the engine's
        assert first[0] != first[1], method                      # layers draw independently
