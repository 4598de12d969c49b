"""Prefix caching without an engine: per-KV-block statistic rows let a request whose
prompt starts with cached blocks select exactly the experts of a run without the hit."""

from __future__ import annotations

import pytest
import torch

from tests.oracle import statistic_from_activations
from vllm_griffin.core.config import GriffinConfig
from vllm_griffin.core.state import GriffinState, StepRow

LAYERS, WIDTH, BLOCK = 2, 16, 4

# Every test runs with the C capture kernel and with the plain-torch capture (conftest).
pytestmark = pytest.mark.usefixtures("capture_path")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


_STAGED = [False]


@pytest.fixture(autouse=True, params=[False, True], ids=["rows-in-place", "rows-staged"])
def block_rows(request):
    """Block rows filled in place (a CPU engine) or through the per-step device buffer that
    an accelerator uses (here on the CPU: the same bookkeeping, the same results)."""
    _STAGED[0] = request.param


def make_state(**cfg):
    state = GriffinState(GriffinConfig(**{"method": "topk", **cfg}), LAYERS, WIDTH, torch.device("cpu"), max_seqs=4)
    state.enable_block_stats(num_blocks=32, block_size=BLOCK, staged=_STAGED[0])
    assert state.block_stats.device.type == "cpu"  # host memory, outside the KV budget
    return state


def step(state, rows, z_rows):
    """One step: rows as StepRows, z_rows the activations of each row's scheduled tokens."""
    plan = state.plan_step(rows)
    z = torch.cat(z_rows)
    dense = z if plan.dense_idx is None else z[plan.dense_idx]
    for layer in range(LAYERS):
        if plan.capture_pos is not None:
            state.capture(layer, dense * (layer + 1), plan)
    state.finish_step(plan)
    return plan


def want_experts(z, k=WIDTH // 2):
    return [torch.topk(statistic_from_activations(z * (layer + 1)), k).indices.sort().values.tolist()
            for layer in range(LAYERS)]


def test_cache_hit_selects_the_experts_of_the_full_prompt():
    state = make_state()
    shared = torch.randn(12, WIDTH)
    za = torch.cat([shared, torch.randn(3, WIDTH)])  # a: 15 tokens, blocks 3,4,5 full + one partial
    blocks_a = [3, 4, 5, 6]
    step(state, [StepRow("a", 15, 0, 8, block_ids=blocks_a)], [za[:8]])
    step(state, [StepRow("a", 15, 8, 7, block_ids=blocks_a)], [za[8:]])
    assert state.experts_of("a") and [e.tolist() for e in state.experts_of("a")] == want_experts(za)
    # b shares a's first 12 tokens: vLLM hands it a's three full blocks and computes from 12.
    zb = torch.cat([shared, torch.randn(6, WIDTH)])
    plan = step(state, [StepRow("b", 18, 12, 6, block_ids=[3, 4, 5, 9, 10])], [zb[12:]])
    assert [s.req_id for s, _ in plan.block_hits] == ["b"] and plan.capture_pos.tolist() == list(range(6))
    got = [e.tolist() for e in state.experts_of("b")]
    assert got == want_experts(zb)
    assert state.prefix_hits == 1 and state.prefix_hit_tokens == 12


def test_hit_on_blocks_filled_in_the_same_step_and_chunked_rest():
    state = make_state()
    shared = torch.randn(8, WIDTH)
    za, zb = torch.cat([shared, torch.randn(2, WIDTH)]), torch.cat([shared, torch.randn(9, WIDTH)])
    # vLLM caches a's blocks when it schedules them, so b may hit them in that very step.
    rows = [StepRow("a", 10, 0, 10, block_ids=[1, 2, 3]), StepRow("b", 17, 8, 4, block_ids=[1, 2, 7, 8, 9])]
    step(state, rows, [za, zb[8:12]])
    step(state, [StepRow("a", 10, 10, 1), StepRow("b", 17, 12, 5, block_ids=[1, 2, 7, 8, 9])],
         [torch.randn(1, WIDTH), zb[12:]])
    assert [e.tolist() for e in state.experts_of("a")] == want_experts(za)
    assert [e.tolist() for e in state.experts_of("b")] == want_experts(zb)


def test_reused_block_rows_start_from_zero_and_only_prompt_blocks_are_written():
    state = make_state()
    z1 = torch.randn(6, WIDTH)
    step(state, [StepRow("x", 6, 0, 6, block_ids=[2, 3])], [z1])
    # Block 3 holds tokens 4-5 and then generated tokens: never a statistic row.
    assert state.block_stats[:, 3].abs().sum() == 0
    state.release("x")
    # vLLM evicts block 2 and hands it to y; its row restarts from y's tokens.
    z2 = torch.randn(9, WIDTH)
    step(state, [StepRow("y", 9, 0, 9, block_ids=[2, 5, 6])], [z2])
    for layer in range(LAYERS):
        contrib = (z2[:4] * (layer + 1)).square()
        want = (contrib / contrib.sum(-1, keepdim=True)).sum(0)
        torch.testing.assert_close(state.block_stats[layer, 2], want)


def test_dense_and_magnitude_requests_fill_block_rows_too():
    state = make_state(method="magnitude")
    z = torch.randn(8, WIDTH)
    step(state, [StepRow("m", 8, 0, 8, block_ids=[4, 5]),
                 StepRow("d", 8, 0, 8, {"griffin": {"density": 1.0}}, block_ids=[6, 7])], [z, z])
    assert torch.equal(state.block_stats[:, 4:6], state.block_stats[:, 6:8])
    assert state.block_stats[:, 4:8].abs().sum() > 0


def test_hit_without_block_rows_fails_loudly():
    state = GriffinState(GriffinConfig(method="topk"), LAYERS, WIDTH, torch.device("cpu"), max_seqs=4)
    with pytest.raises(RuntimeError, match="skipped prompt tokens"):
        state.plan_step([StepRow("a", 40, 16, 8, block_ids=[1, 2, 3, 4])])


def test_resumed_from_a_cache_hit_keeps_its_experts_and_counts_a_restart():
    state = make_state()
    z = torch.randn(8, WIDTH)
    step(state, [StepRow("a", 8, 0, 8, block_ids=[1, 2])], [z])
    before = [e.tolist() for e in state.experts_of("a")]
    for pos in (8, 9, 10):
        step(state, [StepRow("a", 8, pos, 1)], [torch.randn(1, WIDTH)])
    assert state.restarts == 0
    # Preempted; its first block is still cached, so it recomputes from token 4.
    plan = step(state, [StepRow("a", 8, 4, 7, block_ids=[1, 5, 6])], [torch.randn(7, WIDTH)])
    assert state.restarts == 1 and not plan.finishing and not plan.block_hits
    assert plan.sparse_idx.tolist() == [4, 5, 6]
    assert [e.tolist() for e in state.experts_of("a")] == before


def test_a_reused_block_row_holds_only_its_new_prompt():
    """vLLM evicts and reuses KV blocks: a block refilled by another prompt must start its
    statistic row from zero, or a later hit on it adds the old prompt's tokens too."""
    state = make_state()
    za = torch.randn(9, WIDTH)
    step(state, [StepRow("a", 9, 0, 9, block_ids=[7, 8, 9])], [za])  # fills rows 7 and 8
    state.release("a")
    # Blocks 7 and 8 evicted; c's prompt (new tokens) fills them again from their first token.
    zc = torch.randn(9, WIDTH)
    step(state, [StepRow("c", 9, 0, 9, block_ids=[7, 8, 11])], [zc])
    assert [e.tolist() for e in state.experts_of("c")] == want_experts(zc)
    # d shares c's first 8 tokens: a hit on blocks 7 and 8 must stand for c's tokens alone.
    zd = torch.cat([zc[:8], torch.randn(5, WIDTH)])
    step(state, [StepRow("d", 13, 8, 5, block_ids=[7, 8, 12, 13])], [zd[8:]])
    assert [e.tolist() for e in state.experts_of("d")] == want_experts(zd)
