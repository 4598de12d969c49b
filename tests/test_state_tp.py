"""Tensor-parallel selection without an engine: two GriffinStates, one per rank,
each holding half the neurons, joined by in-process collectives (one thread per rank)."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.oracle import statistic_from_activations
from vllm_griffin.core.config import GriffinConfig
from vllm_griffin.core.state import GriffinState, StepRow, TensorParallel

LAYERS, WIDTH, RANKS = 2, 16, 2  # WIDTH: neurons per layer over all ranks


class Collectives:
    """all_reduce / all_gather between threads, like a TP group of RANKS ranks."""

    def __init__(self):
        self.barrier = threading.Barrier(RANKS)
        self.slots: list[torch.Tensor | None] = [None] * RANKS
        self.calls = 0

    def _exchange(self, rank, tensor):
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()
        if rank == 0:
            self.calls += 1
        return everyone

    def for_rank(self, rank):
        return dict(all_reduce=lambda t: sum(self._exchange(rank, t)),
                    all_gather=lambda t: torch.cat(self._exchange(rank, t), dim=-1))


def run_ranks(fn):
    """fn(rank) on every rank at once; re-raises the first failure."""
    results, errors = [None] * RANKS, []

    def target(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)
            group.barrier.abort()  # the other rank stops waiting for this one

    threads = [threading.Thread(target=target, args=(r,)) for r in range(RANKS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    if errors:
        raise errors[0]
    return results


group: Collectives


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def make_ranks(selection, tmp_path=None, **cfg):
    global group
    group = Collectives()
    cfg = {"method": "topk", **cfg}
    return [GriffinState(GriffinConfig(**cfg), LAYERS, WIDTH // RANKS, torch.device("cpu"), max_seqs=4,
                         export_dir=tmp_path, export_enabled=rank == 0,
                         tp=TensorParallel(rank, RANKS, selection=selection, **group.for_rank(rank)))
            for rank in range(RANKS)]


def prefill(states, z_full, chunks=(5, 4), req="a", extra_args=None):
    """Run the prompt of z_full [T, WIDTH] (layer l sees z_full * (l + 1)) through every rank."""
    prompt_len = z_full.shape[0]
    half = WIDTH // RANKS

    def one_rank(rank):
        state, computed = states[rank], 0
        for chunk in chunks:
            plan = state.plan_step([StepRow(req, prompt_len, computed, chunk, extra_args)])
            z = z_full[computed:computed + chunk, rank * half:(rank + 1) * half]
            for layer in range(LAYERS):
                if plan.capture_pos is not None:
                    state.capture(layer, z * (layer + 1), plan)
            state.finish_step(plan)
            computed += chunk
        return [e + rank * half for e in state.experts_of(req)]

    return run_ranks(one_rank)


def test_global_selection_is_the_single_device_top_k(tmp_path):
    from vllm_griffin.core.export import read_experts

    z = torch.randn(9, WIDTH)
    z[:, : WIDTH // RANKS] *= 3  # rank 0's neurons dominate: the ranks keep different counts
    states = make_ranks("global", tmp_path, density=0.5)
    per_rank = prefill(states, z)
    exported, meta = read_experts(tmp_path / "a.safetensors")
    for layer in range(LAYERS):
        want = torch.topk(statistic_from_activations(z * (layer + 1)), WIDTH // 2).indices.sort().values
        got = torch.cat([per_rank[r][layer] for r in range(RANKS)]).sort().values
        assert got.tolist() == want.tolist()
        assert exported[layer].tolist() == want.tolist()  # global indices, written once by rank 0
    counts = [states[r].requests["a"].k for r in range(RANKS)]
    assert counts[0] != counts[1] and [sum(c) for c in zip(*counts)] == [WIDTH // 2] * LAYERS
    # Decode rows run each rank's own count of experts.
    plans = [s.plan_step([StepRow("a", 9, 9, 1)]) for s in states]
    assert [p.sparse_kmax for p in plans] == [list(c) for c in counts]


def test_norm_is_reduced_over_ranks():
    # A per-rank norm would weigh tokens differently; with one loud token on rank 1
    # the per-rank and the global statistics pick different neurons on rank 0.
    z = torch.rand(6, WIDTH) + 0.1
    z[0, WIDTH // 2:] *= 50
    states = make_ranks("global", density=0.25)
    per_rank = prefill(states, z, chunks=(6,))
    want = torch.topk(statistic_from_activations(z), WIDTH // 4).indices.sort().values
    assert torch.cat([per_rank[r][0] for r in range(RANKS)]).sort().values.tolist() == want.tolist()


def test_per_rank_selection_is_balanced():
    z = torch.randn(7, WIDTH)
    z[:, : WIDTH // RANKS] *= 3
    states = make_ranks("per_rank", density=0.5)
    per_rank = prefill(states, z, chunks=(7,))
    stat = statistic_from_activations(z)
    half = WIDTH // RANKS
    for rank in range(RANKS):
        assert states[rank].requests["a"].k == (half // 2,) * LAYERS
        want = torch.topk(stat[rank * half:(rank + 1) * half], half // 2).indices + rank * half
        assert per_rank[rank][0].tolist() == want.sort().values.tolist()


@pytest.mark.parametrize("method", ["magnitude", "random", "sample"])
def test_other_methods_pick_the_same_global_experts_on_every_rank(method):
    z = torch.randn(5, WIDTH)
    states = make_ranks("global", density=0.5, method=method)
    for rank, state in enumerate(states):
        state.static_scores[:] = torch.arange(WIDTH, dtype=torch.float32)[rank * 8:(rank + 1) * 8]
    per_rank = prefill(states, z, chunks=(5,))
    for layer in range(LAYERS):
        got = torch.cat([per_rank[r][layer] for r in range(RANKS)])
        assert len(set(got.tolist())) == WIDTH // 2  # disjoint slices, k in total
        if method == "magnitude":
            assert sorted(got.tolist()) == list(range(WIDTH // 2, WIDTH))


def test_the_default_gated_runs_topk_under_tensor_parallelism():
    """Per-token gating needs every neuron's gate on one device: under TP the default method
    (gated, refresh 4) runs the paper's topk without refreshes, with one warning."""
    states = make_ranks("global", method="gated")
    prefill(states, torch.randn(9, WIDTH))
    for state in states:
        req = state.requests["a"]
        assert (req.method, req.refresh, req.token_k) == ("topk", 0, None) and state._warned_gated
