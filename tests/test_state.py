"""The per-request lifecycle without an engine: which tokens are captured, when
experts are selected, what decodes sparsely, and that slots are reused."""

from __future__ import annotations

import pytest
import torch

from tests.oracle import statistic_from_activations
from vllm_griffin.core.config import GriffinConfig
from vllm_griffin.core.state import GriffinState, StepRow

LAYERS, WIDTH = 2, 16

# Every test runs with the C capture kernel and with the plain-torch capture (conftest).
pytestmark = pytest.mark.usefixtures("capture_path")


def make_state(max_seqs=4, **cfg):
    return GriffinState(GriffinConfig(**{"method": "topk", **cfg}), LAYERS, WIDTH, torch.device("cpu"), max_seqs=max_seqs)


def run_layers(state, plan, z_all):
    """What GriffinMLP does with a plan, for activations z_all [tokens, WIDTH]."""
    dense = z_all if plan.dense_idx is None else z_all[plan.dense_idx]
    for layer in range(LAYERS):
        if plan.capture_pos is not None:
            state.capture(layer, dense * (layer + 1), plan)
    state.finish_step(plan)


def test_chunked_prompt_with_one_token_last_chunk_selects_the_definition():
    state = make_state()
    z = torch.randn(33, WIDTH)
    computed = 0
    for chunk in (16, 16, 1):
        plan = state.plan_step([StepRow("a", 33, computed, chunk)])
        assert plan.sparse_idx is None and plan.capture_pos.tolist() == list(range(chunk))
        assert bool(plan.finishing) == (chunk == 1)
        run_layers(state, plan, z[computed:computed + chunk])
        computed += chunk
    for layer in range(LAYERS):
        want = torch.topk(statistic_from_activations(z * (layer + 1)), WIDTH // 2).indices.sort().values
        assert state.experts_of("a")[layer].tolist() == want.tolist()
        # The mask table holds the same experts for the masked-dense path.
        assert state.masks[layer, state.requests["a"].slot].nonzero().flatten().tolist() == want.tolist()
    # The next token decodes on the experts.
    plan = state.plan_step([StepRow("a", 33, 33, 1)])
    assert plan.dense_idx.tolist() == [] and plan.sparse_idx.tolist() == [0]
    assert plan.sparse_kmax == [8, 8] and plan.capture_pos is None


def test_mixed_batch_groups_tokens_and_mixed_densities():
    state = make_state()
    # a: prompt of 3 done earlier (decoding); b: 5-token prompt in one chunk; c: dense request.
    run_layers(state, state.plan_step([StepRow("a", 3, 0, 3, {"griffin": {"density": 0.25}})]), torch.randn(3, WIDTH))
    rows = [StepRow("a", 3, 3, 1), StepRow("b", 5, 0, 5), StepRow("c", 4, 0, 4, {"griffin_density": 1.0})]
    plan = state.plan_step(rows)
    assert plan.sparse_idx.tolist() == [0]
    assert plan.dense_idx.tolist() == list(range(1, 10))
    assert plan.capture_pos.tolist() == list(range(0, 5))  # b's tokens only, within dense_idx
    assert [s.req_id for s in plan.finishing] == ["b"]
    assert plan.sparse_kmax == [4, 4]  # a: floor(0.25 * 16)
    run_layers(state, plan, torch.randn(10, WIDTH))
    plan = state.plan_step([StepRow("a", 3, 4, 1), StepRow("b", 5, 5, 1), StepRow("c", 4, 4, 1)])
    assert plan.sparse_idx.tolist() == [0, 1] and plan.dense_idx.tolist() == [2]
    assert plan.sparse_kmax == [8, 8] and [c.tolist() for c in plan.sparse_counts] == [[4, 8], [4, 8]]


def test_recompute_after_preemption_keeps_experts_and_never_captures_output_tokens():
    state = make_state()
    run_layers(state, state.plan_step([StepRow("a", 6, 0, 6)]), torch.randn(6, WIDTH))
    experts = [e.clone() for e in state.experts_of("a")]
    # Preempted after 3 generated tokens; resumed by recomputing prompt + outputs.
    plan = state.plan_step([StepRow("a", 6, 0, 9)])
    assert plan.capture_pos is None and not plan.finishing
    assert plan.dense_idx.tolist() == list(range(6)) and plan.sparse_idx.tolist() == [6, 7, 8]
    run_layers(state, plan, torch.randn(9, WIDTH))
    assert [e.tolist() for e in state.experts_of("a")] == [e.tolist() for e in experts]


def test_preempted_mid_prompt_counts_each_prompt_token_once():
    state = make_state()
    z = torch.randn(20, WIDTH)
    run_layers(state, state.plan_step([StepRow("a", 20, 0, 12)]), z[:12])
    # Recompute from 0 after preemption: only tokens 12.. are new to the statistic.
    plan = state.plan_step([StepRow("a", 20, 0, 20)])
    assert plan.capture_pos.tolist() == list(range(12, 20))
    run_layers(state, plan, z)
    want = torch.topk(statistic_from_activations(z), 8).indices.sort().values
    assert state.experts_of("a")[0].tolist() == want.tolist()


def test_magnitude_and_dense_requests_capture_nothing():
    state = make_state(method="magnitude")
    state.static_scores[:] = torch.arange(WIDTH, dtype=torch.float32)
    plan = state.plan_step([StepRow("m", 4, 0, 4), StepRow("d", 4, 0, 4, {"griffin": {"density": 1.0}})])
    assert plan.capture_pos is None and [s.req_id for s in plan.finishing] == ["m"]
    run_layers(state, plan, torch.randn(8, WIDTH))
    assert state.experts_of("m")[0].tolist() == list(range(8, 16))
    assert state.masks[0, state.requests["m"].slot].nonzero().flatten().tolist() == list(range(8, 16))
    # Only dense work left: the plan says so, and layers take the untouched path.
    assert state.plan_step([StepRow("d", 4, 4, 1)]).all_dense


def counters(state):
    state.check_invariants()  # every look also checks the pools against the requests
    return {k: v for k, v in state.counters().items() if k in ("requests_live", "slots_in_use", "slot_capacity",
                                                                 "acc_in_use", "prefilling")}


def test_slots_are_released_reused_and_grow_without_losing_experts():
    state = make_state(max_seqs=2)
    for name in "ab":
        run_layers(state, state.plan_step([StepRow(name, 4, 0, 4)]), torch.randn(4, WIDTH))
    before = {name: [e.tolist() for e in state.experts_of(name)] for name in "ab"}
    masks_before = state.masks[:, [state.requests[n].slot for n in "ab"]].clone()
    run_layers(state, state.plan_step([StepRow("c", 4, 0, 4)]), torch.randn(4, WIDTH))  # grows the tables
    assert counters(state) == dict(requests_live=3, slots_in_use=3, slot_capacity=4, acc_in_use=0, prefilling=0)
    assert state.experts.shape[1] == state.masks.shape[1] == 4
    # The rows written before the growth survive it, in both tables.
    assert {name: [e.tolist() for e in state.experts_of(name)] for name in "ab"} == before
    assert torch.equal(state.masks[:, [state.requests[n].slot for n in "ab"]], masks_before)
    freed = state.requests["b"].slot
    state.release("b")
    state.release("b")  # twice is harmless (abort racing finish)
    assert counters(state) == dict(requests_live=2, slots_in_use=2, slot_capacity=4, acc_in_use=0, prefilling=0)
    assert state.slots.is_free(freed)
    run_layers(state, state.plan_step([StepRow("d", 4, 0, 4)]), torch.randn(4, WIDTH))
    assert state.requests["d"].slot == freed  # the freed slot is the one reused
    assert counters(state)["slots_in_use"] == 3
    with pytest.raises(ValueError, match=f"slot {freed + 100} is not in use"):
        state.slots.release(freed + 100)


def test_abort_mid_prompt_and_mid_decode_frees_slot_and_accumulator():
    state = make_state()
    run_layers(state, state.plan_step([StepRow("p", 40, 0, 16), StepRow("q", 8, 0, 8)]), torch.randn(24, WIDTH))
    # p is mid-prompt (an accumulator), q decodes (none).
    assert counters(state) == dict(requests_live=2, slots_in_use=2, slot_capacity=4, acc_in_use=1, prefilling=1)
    state.release("p")  # abort mid-prompt
    assert counters(state) == dict(requests_live=1, slots_in_use=1, slot_capacity=4, acc_in_use=0, prefilling=0)
    run_layers(state, state.plan_step([StepRow("q", 8, 8, 1)]), torch.randn(1, WIDTH))
    state.release("q")  # abort mid-decode
    assert counters(state) == dict(requests_live=0, slots_in_use=0, slot_capacity=4, acc_in_use=0, prefilling=0)
    # A refresh request keeps its accumulator while it decodes, and gives it back at the end.
    run_layers(state, state.plan_step([StepRow("r", 4, 0, 4, {"griffin": {"refresh": 2}})]), torch.randn(4, WIDTH))
    for pos in range(4, 9):
        run_layers(state, state.plan_step([StepRow("r", 4, pos, 1)]), torch.randn(1, WIDTH))
        assert counters(state)["acc_in_use"] == 1
    state.release("r")
    assert counters(state) == dict(requests_live=0, slots_in_use=0, slot_capacity=4, acc_in_use=0, prefilling=0)


def test_preemption_and_resume_hold_one_slot_and_free_everything_at_the_end():
    state = make_state()
    z = torch.randn(20, WIDTH)
    run_layers(state, state.plan_step([StepRow("a", 20, 0, 12)]), z[:12])
    assert counters(state)["acc_in_use"] == 1
    # Preempted mid-prompt, resumed from token 0: still one slot and one accumulator.
    run_layers(state, state.plan_step([StepRow("a", 20, 0, 20)]), z)
    assert counters(state) == dict(requests_live=1, slots_in_use=1, slot_capacity=4, acc_in_use=0, prefilling=0)
    # Preempted while decoding, resumed by recomputing prompt + outputs.
    run_layers(state, state.plan_step([StepRow("a", 20, 0, 23)]), torch.randn(23, WIDTH))
    assert counters(state) == dict(requests_live=1, slots_in_use=1, slot_capacity=4, acc_in_use=0, prefilling=0)
    assert state.restarts == 2
    state.release("a")
    assert counters(state)["slots_in_use"] == 0 and counters(state)["acc_in_use"] == 0


def test_check_invariants_names_what_disagrees():
    state = make_state()
    run_layers(state, state.plan_step([StepRow("a", 40, 0, 16)]), torch.randn(16, WIDTH))
    state.slots.release(state.requests["a"].slot)  # as a release without the request's removal
    with pytest.raises(RuntimeError, match="slot is on the free list.*0 slots in use for 1 live requests"):
        state.check_invariants()
    state = make_state()
    run_layers(state, state.plan_step([StepRow("a", 40, 0, 16)]), torch.randn(16, WIDTH))
    state.requests.pop("a")  # as a release that forgot the pools
    with pytest.raises(RuntimeError, match="1 slots in use for 0 live requests.*1 accumulator slots in use, 0 held"):
        state.check_invariants()


def test_skipped_prompt_tokens_fail_loudly():
    state = make_state()
    with pytest.raises(RuntimeError, match="skipped prompt tokens"):
        state.plan_step([StepRow("a", 40, 16, 8)])  # as a prefix-cache hit would look


def test_bad_options_that_slip_past_the_front_end_fall_back_to_defaults():
    state = make_state(density=0.25)
    plan = state.plan_step([StepRow("a", 4, 0, 4, {"griffin": {"density": 7}})])
    assert state.requests["a"].k == (4, 4) and [s.req_id for s in plan.finishing] == ["a"]


def test_refresh_runs_every_rth_generated_token_dense_and_reselects_from_prompt_plus_refresh_tokens():
    """refresh=R: generated tokens R, 2R, ... run the full MLP, their contribution joins the
    statistic weighted R (decay 1: the whole text so far) and the experts follow it; other
    generated tokens decode on the experts; a recompute after preemption counts no token twice."""
    R = 3
    state = make_state(refresh=R)
    prompt = torch.randn(5, WIDTH)
    run_layers(state, state.plan_step([StepRow("a", 5, 0, 5)]), prompt)
    req = state.requests["a"]
    assert req.refresh == R and req.acc_slot is not None  # the statistic stays for refreshes
    # The oracle's statistic is sqrt(sum); the sums add.
    stat = [statistic_from_activations(prompt * (layer + 1)).square() for layer in range(LAYERS)]
    for pos in range(5, 5 + 2 * R + 1):
        plan = state.plan_step([StepRow("a", 5, pos, 1)])
        generated = pos - 5
        if generated and generated % R == 0:
            assert plan.sparse_idx is None and plan.capture_pos.tolist() == [0]
            assert [(s.req_id, p) for s, _, p in plan.refreshes] == [("a", pos)]
            z = torch.randn(1, WIDTH)
            run_layers(state, plan, z)
            for layer in range(LAYERS):
                stat[layer] = stat[layer] + R * statistic_from_activations(z * (layer + 1)).square()
                want = torch.topk(stat[layer], WIDTH // 2).indices.sort().values
                assert state.experts_of("a")[layer].tolist() == want.tolist()
                assert state.masks[layer, req.slot].nonzero().flatten().tolist() == want.tolist()
        else:
            assert plan.sparse_idx.tolist() == [0] and plan.capture_pos is None and not plan.refreshes
            run_layers(state, plan, torch.randn(1, WIDTH))
    assert state.refresh_tokens == 2 and state.acc_slots.in_use == 1  # scratch slots returned
    # Preempted and recomputed from 0: prompt and the two refresh tokens are not counted again.
    experts = [e.tolist() for e in state.experts_of("a")]
    plan = state.plan_step([StepRow("a", 5, 0, 5 + 2 * R + 1)])
    assert plan.capture_pos is None and not plan.refreshes and not plan.finishing
    run_layers(state, plan, torch.randn(5 + 2 * R + 1, WIDTH))
    assert [e.tolist() for e in state.experts_of("a")] == experts
    # The next due token refreshes again; release frees the kept statistic.
    plan = state.plan_step([StepRow("a", 5, 5 + 3 * R, 1)])
    assert len(plan.refreshes) == 1
    run_layers(state, plan, torch.randn(1, WIDTH))
    state.release("a")
    assert state.acc_slots.in_use == 0 and state.slots.in_use == 0


@pytest.mark.parametrize("resume_at", [0, 7], ids=["from-0", "prefix-hit-mid-output"])
def test_recompute_of_a_refreshing_request_runs_each_token_as_it_first_ran(resume_at):
    """Preempted and recomputed, a refreshing request's output tokens run on the experts
    they first ran on (each stretch between refreshes its own), its refresh tokens run the
    full MLP again without being counted twice, and the slots lent for it come back."""
    R, P = 3, 5
    state = make_state(refresh=R)
    run_layers(state, state.plan_step([StepRow("a", P, 0, P)]), torch.randn(P, WIDTH))
    req = state.requests["a"]
    first_ran = {}  # position -> masks [L, D] it decoded on, or "dense"
    for pos in range(P, P + 2 * R + 2):
        plan = state.plan_step([StepRow("a", P, pos, 1)])
        if plan.refreshes:
            first_ran[pos] = "dense"
        else:
            first_ran[pos] = state.masks[:, plan.sparse_slot[0]].clone()
        run_layers(state, plan, torch.randn(1, WIDTH))
    assert req.epoch_start == P + 2 * R + 1 and len(req.past_epochs) == 2
    assert state.counters()["past_experts_bytes"] == 2 * LAYERS * WIDTH // 8
    acc, current = state.acc[:, req.acc_slot].clone(), state.masks[:, req.slot].clone()

    end = P + 2 * R + 3  # the recompute also runs the newest sampled token
    first_ran[end - 1] = current
    plan = state.plan_step([StepRow("a", P, resume_at, end - resume_at)])
    assert plan.capture_pos is None and not plan.refreshes and not plan.finishing
    dense = set(plan.dense_idx.tolist())
    sparse = dict(zip(plan.sparse_idx.tolist(), plan.sparse_slot.tolist()))
    for pos in range(max(resume_at, P), end):
        i = pos - resume_at
        if isinstance(first_ran[pos], str):
            assert i in dense and i not in sparse, pos
        else:
            assert torch.equal(state.masks[:, sparse[i]], first_ran[pos]), pos
            experts, counts = state.sparse_experts(0, plan)
            row = list(sparse).index(i)
            want = first_ran[pos][0].nonzero().flatten()
            assert experts[row, : counts[row]].tolist() == want.tolist(), pos
    assert len(set(sparse.values())) == 3 and state.slots.in_use == 3  # two lent for the step
    run_layers(state, plan, torch.randn(end - resume_at, WIDTH))
    assert state.slots.in_use == 1 and torch.equal(state.acc[:, req.acc_slot], acc)
    assert torch.equal(state.masks[:, req.slot], current)
    state.check_invariants()
    # A step whose forward pass failed (no finish_step) gives its lent slots back at the next plan.
    state.plan_step([StepRow("a", P, 0, end)])
    plan = state.plan_step([StepRow("a", P, end, 1)])  # a refresh: a scratch accumulator lent
    assert state.slots.in_use == 1 and len(plan.refreshes) == 1 and state.acc_slots.in_use == 2
    state.release("a")  # aborted; the next step takes back what the failed one borrowed
    state.plan_step([])
    assert state.counters()["slots_in_use"] == 0 and state.acc_slots.in_use == 0
    state.check_invariants()


def test_loop_guard_refreshes_where_the_output_repeats_itself_and_a_recompute_replays_it():
    """loop_guard=n: a generated token whose last n output tokens already ended an earlier
    output position runs the full MLP and refreshes, weighted by the tokens generated since
    the last refresh; a recompute after preemption runs those tokens dense again, uncounted,
    and its other tokens on the experts they first ran on."""
    P = 5
    # Output bigrams: (7, 8) ends at index 1, again at 4 and at 9: the guard (n = 2) fires there.
    out = [7, 8, 9, 7, 8, 1, 2, 3, 7, 8, 4]
    tokens = torch.tensor([100, 101, 102, 103, 104] + out).numpy()
    state = make_state(loop_guard=2)
    prompt = torch.randn(P, WIDTH)
    run_layers(state, state.plan_step([StepRow("a", P, 0, P, token_ids=tokens)]), prompt)
    req = state.requests["a"]
    assert (req.refresh, req.loop_guard, req.refreshing) == (0, 2, True) and req.acc_slot is not None
    stat = [statistic_from_activations(prompt * (layer + 1)).square() for layer in range(LAYERS)]
    first_ran = {}
    for pos in range(P, P + len(out)):
        plan = state.plan_step([StepRow("a", P, pos, 1, token_ids=tokens)])
        if pos - P in (4, 9):
            assert [(s.req_id, p) for s, _, p in plan.refreshes] == [("a", pos)], pos
            z = torch.randn(1, WIDTH)
            run_layers(state, plan, z)
            since = 4 if pos - P == 4 else 5
            for layer in range(LAYERS):
                stat[layer] = stat[layer] + since * statistic_from_activations(z * (layer + 1)).square()
                want = torch.topk(stat[layer], WIDTH // 2).indices.sort().values
                assert state.experts_of("a")[layer].tolist() == want.tolist()
            first_ran[pos] = "dense"
        else:
            assert not plan.refreshes and plan.sparse_idx.tolist() == [0], pos
            first_ran[pos] = state.masks[:, plan.sparse_slot[0]].clone()
            run_layers(state, plan, torch.randn(1, WIDTH))
    assert state.refresh_tokens == 2 and state.loop_guard_tokens == 2
    assert req.refresh_positions == [P + 4, P + 9] and req.epoch_starts == [P, P + 5]
    acc = state.acc[:, req.acc_slot].clone()
    # Preempted, recomputed from 0: the guard's tokens run dense, nothing is counted twice.
    end = P + len(out)
    plan = state.plan_step([StepRow("a", P, 0, end, token_ids=tokens)])
    assert plan.capture_pos is None and not plan.refreshes and not plan.finishing
    dense, sparse = set(plan.dense_idx.tolist()), dict(zip(plan.sparse_idx.tolist(), plan.sparse_slot.tolist()))
    for pos in range(P, end):
        if first_ran[pos] == "dense":
            assert pos in dense and pos not in sparse, pos
        else:
            assert torch.equal(state.masks[:, sparse[pos]], first_ran[pos]), pos
    run_layers(state, plan, torch.randn(end, WIDTH))
    assert torch.equal(state.acc[:, req.acc_slot], acc) and state.refresh_tokens == 2
    state.check_invariants()
    # With a fixed schedule too (refresh 3): both fire, each weighted by the tokens since the last.
    state = make_state(loop_guard=2, refresh=3)
    run_layers(state, state.plan_step([StepRow("b", P, 0, P, token_ids=tokens)]), prompt)
    fired = []
    for pos in range(P, end):
        plan = state.plan_step([StepRow("b", P, pos, 1, token_ids=tokens)])
        fired += [p - P for _, _, p in plan.refreshes]
        run_layers(state, plan, torch.randn(1, WIDTH))
    assert fired == [3, 4, 6, 9] and state.loop_guard_tokens == 1  # 9 is on the schedule too


def test_loop_guard_reads_only_verified_tokens():
    """A speculative draft is not output yet: where the row's token ids end before a position
    (the runner passes them up to the last verified token), the guard does not fire there."""
    P, out = 3, [7, 8, 7, 8]
    tokens = torch.tensor([100, 101, 102] + out).numpy()
    state = make_state(loop_guard=2)
    run_layers(state, state.plan_step([StepRow("a", P, 0, P, token_ids=tokens)]), torch.randn(P, WIDTH))
    for pos in (P, P + 1):
        run_layers(state, state.plan_step([StepRow("a", P, pos, 1, token_ids=tokens)]), torch.randn(1, WIDTH))
    # Positions P+2 (verified) and P+3 (a draft) in one row: (7, 8) repeats at index 3, a draft.
    plan = state.plan_step([StepRow("a", P, P + 2, 2, token_ids=tokens[: P + 3])])
    assert not plan.refreshes and plan.sparse_idx.tolist() == [0, 1]
    # Verified later, the same position fires.
    plan = state.plan_step([StepRow("a", P, P + 3, 1, token_ids=tokens)])
    assert [p for _, _, p in plan.refreshes] == [P + 3]


def test_loop_guard_is_off_where_the_runner_shows_no_token_ids():
    state = make_state(loop_guard=4)
    state.token_ids_visible = False  # asynchronous scheduling, Model Runner V2
    run_layers(state, state.plan_step([StepRow("a", 4, 0, 4)]), torch.randn(4, WIDTH))
    assert state.requests["a"].loop_guard == 0 and not state.requests["a"].refreshing
    assert state.acc_slots.in_use == 0


def test_refresh_is_per_request_and_off_for_dense_and_static_methods():
    state = make_state()
    rows = [StepRow("r", 4, 0, 4, {"griffin": {"refresh": 2}}), StepRow("p", 4, 0, 4),
            StepRow("m", 4, 0, 4, {"griffin": {"refresh": 2, "method": "magnitude"}}),
            StepRow("d", 4, 0, 4, {"griffin_refresh": "2", "griffin_density": 1.0})]
    run_layers(state, state.plan_step(rows), torch.randn(16, WIDTH))
    assert [state.requests[r].refresh for r in "rpmd"] == [2, 0, 0, 0]
    assert state.acc_slots.in_use == 1  # only r keeps its statistic
    rows = [StepRow(r, 4, 6, 1) for r in "rpmd"]  # generated token 2 of each
    plan = state.plan_step(rows)
    assert [s.req_id for s, _, _ in plan.refreshes] == ["r"]
    assert plan.sparse_idx.tolist() == [1, 2] and plan.dense_idx.tolist() == [0, 3]
    assert plan.capture_pos.tolist() == [0]  # r's token, first among the dense ones


def test_default_is_gated_with_refresh_4_and_topk_keeps_the_paper():
    """Nothing set: `gated` refreshing every 4 tokens (no loop guard); `topk` asked by name is
    the paper's (no refresh) unless a refresh is asked for too."""
    state = GriffinState(GriffinConfig(), LAYERS, WIDTH, torch.device("cpu"), max_seqs=4)
    rows = [StepRow("d", 4, 0, 4), StepRow("t", 4, 0, 4, {"griffin": {"method": "topk"}}),
            StepRow("r", 4, 0, 4, {"griffin": {"method": "topk", "refresh": 8}})]
    run_layers(state, state.plan_step(rows), torch.randn(12, WIDTH))
    d, t, r = (state.requests[x] for x in "dtr")
    # Width 16 at 0.5: a budget of 8 neurons, a pool of 12 and 6 experts per token ((12 + 2 * 6) / 3 = 8).
    assert (d.method, d.refresh, d.loop_guard, d.k, d.token_k) == ("gated", 4, 0, (12, 12), (6, 6))
    assert (t.method, t.refresh, t.loop_guard, t.token_k) == ("topk", 0, 0, None) and (r.refresh, r.k) == (8, (8, 8))


def test_a_gated_row_in_the_step_leaves_the_other_rows_their_experts():
    """A decode step with a `gated` row beside a `topk` row: the per-layer k tables the kernels
    read as contiguous int64 are contiguous, give each token its own request's values, and the
    masked path keeps the `topk` row's whole expert set (a strided k table handed the `topk`
    row the `gated` row's k: its decode ran on a per-token subset of its experts)."""
    from vllm_griffin.ops import dispatch

    state = make_state()
    gated = {"griffin": {"method": "gated", "refresh": 0}}
    rows = [StepRow("g", 6, 0, 6, gated), StepRow("t", 5, 0, 5), StepRow("g2", 4, 0, 4, gated)]
    run_layers(state, state.plan_step(rows), torch.randn(15, WIDTH))
    plan = state.plan_step([StepRow("g", 6, 6, 1, gated), StepRow("t", 5, 5, 1), StepRow("g2", 4, 4, 1, gated)])
    g, t = state.requests["g"], state.requests["t"]
    for layer in range(LAYERS):
        ks, counts = plan.sparse_token_k[layer], plan.sparse_counts[layer]
        assert ks.is_contiguous() and counts.is_contiguous()
        assert ks.tolist() == [g.token_k[layer], 0, g.token_k[layer]] and counts.tolist() == [g.k[layer], t.k[layer],
                                                                                              g.k[layer]]
    act_and_mul = lambda x: torch.nn.functional.silu(x[:, :WIDTH]) * x[:, WIDTH:]  # noqa: E731
    fn = dispatch.gated_masked_activation_fn(torch.device("cpu"), torch.float32, "silu", act_and_mul, True)
    plain = dispatch.masked_activation_fn(torch.device("cpu"), torch.float32, "silu", act_and_mul)
    gate_up = torch.randn(3, 2 * WIDTH)
    for layer in range(LAYERS):
        z = fn(gate_up, state.masks[layer], plan.sparse_slot, plan.sparse_token_k[layer])
        alone = plain(gate_up[1:2], state.masks[layer], plan.sparse_slot[1:2])
        assert torch.equal(z[1], alone[0])  # the topk row: all its experts, as without the gated rows
        assert int((z[0] != 0).sum()) <= g.token_k[layer]  # the gated rows: k of their pool
        # A strided k table (what the plan used to hand over) gives the same answer now.
        strided = torch.stack([plan.sparse_token_k[layer], plan.sparse_token_k[layer]], dim=1)[:, 0]
        assert not strided.is_contiguous()
        assert torch.equal(fn(gate_up, state.masks[layer], plan.sparse_slot, strided), z)
