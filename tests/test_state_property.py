"""The per-request lifecycle of GriffinState as a state machine (no engine): random
sequences of admissions, prompt chunks mixed with decode rows, prefix-cache hits,
preemption and resume, aborts, finishes and double releases, with a table smaller
than the live requests, checked after every operation against a small model of
what vLLM's scheduler does and of what each request's experts must be.

The model plays vLLM's side: each request holds its tokens (prompt, then one sampled
token each time all its tokens have KV), a number of computed tokens, and KV blocks
from a block pool with a prefix cache of full prompt blocks (the plugin's scheduler
side caches no others). A token's activations are a fixed function of the tokens up
to it, so requests sharing a prompt prefix have the same activations there, and a
hit on another request's blocks must select exactly the experts of the whole prompt.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.oracle import statistic_from_activations
from vllm_griffin.core.config import GriffinConfig
from vllm_griffin.core.state import GriffinState, StepRow

LAYERS, WIDTH = 2, 16
K = WIDTH // 2          # topk at the default density 0.5
MAX_SEQS = 2            # fewer than the live requests: the tables grow
MAX_LIVE = 6
MAX_PROMPT = 40
BLOCK, NUM_BLOCKS = 4, 256
FAMILIES = 3            # prompts share prefixes within a family
DENSE = {"griffin": {"density": 1.0}}
# Relative gap between the k-th and (k+1)-th statistic below which float32 sums may
# legitimately swap them (the oracle is float64): such layers are not compared.
MIN_GAP = 1e-4

# Module-wide tally of what the runs exercised (the test asserts the interesting cases happened).
EVENTS: Counter = Counter()

# Every run goes through the C capture kernel and through the plain-torch capture (conftest).
pytestmark = pytest.mark.usefixtures("capture_path")


def _next_hash(h: int, token: int) -> int:
    return (h * 1_000_003 + token + 1) % (2**61 - 1)


def _activation(h: int, layer: int) -> torch.Tensor:
    """The FF activations [WIDTH] of the token whose token-prefix hashes to ``h``."""
    gen = torch.Generator().manual_seed(h * LAYERS + layer)
    return torch.randn(WIDTH, generator=gen)


@dataclass
class Req:
    rid: str
    tokens: list[int]           # prompt, then sampled tokens
    prompt_len: int
    dense: bool
    hashes: list[int] = field(default_factory=list)  # per token: hash of the tokens up to it
    z: list[list[torch.Tensor]] = field(default_factory=lambda: [[] for _ in range(LAYERS)])
    computed: int = 0           # tokens with KV
    running: bool = False
    admitted: bool = False      # GriffinState has seen it
    done: bool = False          # prompt completed: experts selected (topk)
    captured: int = 0           # prompt tokens in its statistic (GriffinState's own count)
    last_start: int = -1
    blocks: list[int] = field(default_factory=list)
    oracle: list[list[int] | None] | None = None

    def extend(self, tokens: list[int]) -> None:
        for tok in tokens:
            h = _next_hash(self.hashes[-1] if self.hashes else 7, tok)
            self.tokens.append(tok)
            self.hashes.append(h)
            for layer in range(LAYERS):
                self.z[layer].append(_activation(h, layer))

    def rows(self, layer: int, start: int, end: int) -> torch.Tensor:
        return torch.stack(self.z[layer][start:end])

    def want_experts(self) -> list[list[int] | None]:
        """Per layer the oracle's sorted top-k of the whole prompt's statistic (None: a near-tie)."""
        if self.oracle is None:
            self.oracle = []
            for layer in range(LAYERS):
                stat = statistic_from_activations(self.rows(layer, 0, self.prompt_len))
                top = torch.topk(stat, K + 1).values
                if (top[K - 1] - top[K]) / top[K - 1] < MIN_GAP:
                    self.oracle.append(None)
                else:
                    self.oracle.append(torch.topk(stat, K).indices.sort().values.tolist())
        return self.oracle


class Lifecycle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.reqs: dict[str, Req] = {}
        self.waiting: list[str] = []      # vLLM's waiting queue (new and preempted)
        self.released: list[str] = []
        self.prompts: list[list[int]] = []
        self.next_id = 0
        self.next_token = 100_000         # tokens no family prefix holds
        self.restarts = self.prefix_hits = self.prefix_hit_tokens = 0
        self.state: GriffinState | None = None

    # -- vLLM's KV blocks and prefix cache ------------------------------------------

    def _alloc(self) -> int:
        block = self.free.pop()  # most recently freed first: cached blocks are evicted often
        key = self.block_key.pop(block, None)
        if key is not None:
            del self.cache[key]
            EVENTS["block evicted"] += 1
        self.refs[block] = 1
        return block

    def _free_blocks(self, req: Req) -> None:
        for block in reversed(req.blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free.append(block)
        req.blocks = []

    def _hit(self, req: Req) -> int:
        """Cached full prompt blocks the request starts with (at most all tokens but one)."""
        if not self.with_blocks:
            return 0
        hit = 0
        while (hit + BLOCK <= min(req.prompt_len, len(req.tokens) - 1)
               and tuple(req.tokens[: hit + BLOCK]) in self.cache):
            block = self.cache[tuple(req.tokens[: hit + BLOCK])]
            if self.refs[block] == 0:
                self.free.remove(block)
            self.refs[block] += 1
            req.blocks.append(block)
            hit += BLOCK
        return hit

    # -- operations -------------------------------------------------------------------

    @initialize(with_blocks=st.booleans())
    def init(self, with_blocks):
        self.with_blocks = with_blocks
        self.state = GriffinState(GriffinConfig(method="topk"), LAYERS, WIDTH, torch.device("cpu"),
                                  max_seqs=MAX_SEQS)
        if with_blocks:
            self.state.enable_block_stats(NUM_BLOCKS, BLOCK)
        self.free = list(range(NUM_BLOCKS - 1, -1, -1))
        self.refs = [0] * NUM_BLOCKS
        self.cache: dict[tuple[int, ...], int] = {}
        self.block_key: dict[int, tuple[int, ...]] = {}

    @precondition(lambda self: len(self.reqs) < MAX_LIVE)
    @rule(family=st.integers(0, FAMILIES - 1), prompt_len=st.integers(1, MAX_PROMPT), data=st.data(),
          dense=st.sampled_from([False, False, False, True]))
    def add_request(self, family, prompt_len, data, dense):
        """A prompt that starts with part of a family's text or of an earlier prompt, then new tokens."""
        source = [family * 1000 + i for i in range(MAX_PROMPT)]
        if self.prompts and data.draw(st.booleans(), label="extends an earlier prompt"):
            source = data.draw(st.sampled_from(self.prompts), label="earlier prompt")
        shared = data.draw(st.one_of(st.just(prompt_len), st.integers(0, prompt_len)), label="shared")
        shared = min(shared, len(source))
        tail = list(range(self.next_token, self.next_token + prompt_len - shared))
        self.next_token += len(tail)
        req = Req(f"r{self.next_id}", [], prompt_len, dense)
        req.extend(source[:shared] + tail)
        self.next_id += 1
        self.reqs[req.rid] = req
        self.waiting.append(req.rid)
        self.prompts.append(req.tokens[:prompt_len])

    @rule(data=st.data())
    def step(self, data):
        running = [rid for rid in self.reqs if self.reqs[rid].running]
        candidates = data.draw(st.permutations(running), label="order") + list(self.waiting)
        chosen = [rid for rid in candidates if data.draw(st.booleans(), label=f"schedule {rid}")]
        if not chosen:
            return
        rows, z_rows, expect_finishing, sparse_expected = [], [[] for _ in range(LAYERS)], set(), []
        self.step_blocks: set[int] = set()  # blocks this step fills
        offset = 0
        for rid in chosen:
            req = self.reqs[rid]
            if not req.running:  # admitted, or resumed after a preemption
                self.waiting.remove(rid)
                req.running = True
                req.computed = self._hit(req)
                if req.computed:
                    EVENTS["prefix hit"] += 1
                    if set(req.blocks) & self.step_blocks:
                        EVENTS["hit on blocks filled in the same step"] += 1
                if req.admitted:
                    EVENTS["resumed mid-prompt" if not req.done and not req.dense else "resumed"] += 1
            start = req.computed
            remaining = len(req.tokens) - start
            chunk = data.draw(st.one_of(st.just(remaining), st.just(1), st.integers(1, min(remaining, 2 * BLOCK)),
                                        st.integers(1, remaining)),
                              label=f"chunk {rid}")
            end = start + chunk
            if start < req.prompt_len and end == req.prompt_len and chunk == 1 and start > 0:
                EVENTS["1-token last chunk"] += 1
            if self.with_blocks:
                while len(req.blocks) * BLOCK < end:
                    req.blocks.append(self._alloc())
                self.step_blocks.update(req.blocks[start // BLOCK:])
                # vLLM caches full blocks when it schedules them: later rows of this step may hit them.
                for j in range(min(end, req.prompt_len) // BLOCK):
                    key = tuple(req.tokens[: (j + 1) * BLOCK])
                    if key not in self.cache:
                        self.cache[key] = req.blocks[j]
                        self.block_key[req.blocks[j]] = key
            # What GriffinState must do with it (and count).
            if 0 <= start <= req.last_start:
                self.restarts += 1
            req.last_start = start
            if not req.dense and not req.done:
                if start > req.captured:
                    if req.captured:
                        EVENTS["hit past its own counted tokens"] += 1
                    self.prefix_hits += 1
                    self.prefix_hit_tokens += start
                    req.captured = start
                if end >= req.prompt_len:
                    expect_finishing.add(rid)
            if not req.dense and req.done:
                sparse_expected += [(offset + p - start, rid) for p in range(max(start, req.prompt_len), end)]
            if req.admitted and start < req.prompt_len < end and req.done:
                EVENTS["recompute spans prompt and outputs"] += 1
            rows.append(StepRow(rid, req.prompt_len, start, chunk, DENSE if req.dense else None,
                                block_ids=list(req.blocks) if self.with_blocks and start < req.prompt_len else None))
            for layer in range(LAYERS):
                z_rows[layer].append(req.rows(layer, start, end))
            offset += chunk
        if len(rows) > 1 and any(self.reqs[r.req_id].done for r in rows) and any(not self.reqs[r.req_id].done for r in rows):
            EVENTS["mixed prompt and decode rows"] += 1

        plan = self.state.plan_step(rows)
        for row in rows:
            self.reqs[row.req_id].admitted = True
        # The plan: finishing prompts, decode tokens on their request's slot, every token once.
        assert {s.req_id for s in plan.finishing} == expect_finishing
        dense = list(range(offset)) if plan.dense_idx is None else plan.dense_idx.tolist()
        sparse = [] if plan.sparse_idx is None else plan.sparse_idx.tolist()
        assert sorted(dense + sparse) == list(range(offset))
        assert sparse == [pos for pos, _ in sparse_expected]
        if sparse:
            assert plan.sparse_slot.tolist() == [self.state.requests[rid].slot for _, rid in sparse_expected]
        # What GriffinMLP does with the plan (tests/test_state.py::run_layers), layer by layer.
        for layer in range(LAYERS):
            if plan.capture_pos is not None:
                z = torch.cat(z_rows[layer])
                self.state.capture(layer, z if plan.dense_idx is None else z[plan.dense_idx], plan)
        self.state.finish_step(plan)

        for row in rows:
            req = self.reqs[row.req_id]
            req.computed += row.num_scheduled
            if not req.dense and not req.done:
                req.captured = max(req.captured, min(req.computed, req.prompt_len))
            if row.req_id in expect_finishing:
                req.done = True
            if req.computed == len(req.tokens):  # all tokens have KV: one is sampled
                req.extend([self.next_token])
                self.next_token += 1
        if self.state.slots.capacity > MAX_SEQS:
            EVENTS["tables grown"] += 1

    @precondition(lambda self: any(r.running for r in self.reqs.values()))
    @rule(data=st.data())
    def preempt(self, data):
        rid = data.draw(st.sampled_from(sorted(r.rid for r in self.reqs.values() if r.running)), label="preempt")
        req = self.reqs[rid]
        EVENTS["preempted mid-prompt" if req.computed < req.prompt_len else "preempted decoding"] += 1
        req.running, req.computed = False, 0
        self._free_blocks(req)
        self.waiting.insert(0, rid)  # vLLM resumes preempted requests first

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def release(self, data):
        """Finished (after decoding) or aborted (anywhere: waiting, mid-prompt, preempted)."""
        rid = data.draw(st.sampled_from(sorted(self.reqs)), label="release")
        req = self.reqs.pop(rid)
        if not req.admitted:
            EVENTS["released before scheduled"] += 1
        elif not req.running:
            EVENTS["released while preempted"] += 1
        elif req.computed < req.prompt_len:
            EVENTS["aborted mid-prompt"] += 1
        else:
            EVENTS["released decoding"] += 1
        if rid in self.waiting:
            self.waiting.remove(rid)
        if self.with_blocks:
            self._free_blocks(req)
        self.state.release(rid)
        self.released.append(rid)

    @precondition(lambda self: self.released)
    @rule(data=st.data())
    def release_again(self, data):
        self.state.release(data.draw(st.sampled_from(self.released), label="release again"))
        EVENTS["released twice"] += 1

    # -- after every operation --------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self):
        if self.state is None:
            return
        state = self.state
        state.check_invariants()
        live = {rid: r for rid, r in self.reqs.items() if r.admitted}
        assert set(state.requests) == set(live)
        c = state.counters()
        assert c["requests_live"] == c["slots_in_use"] == len(live)
        # An accumulator for each topk request still reading its prompt (scheduled or preempted).
        assert c["acc_in_use"] == sum(1 for r in live.values() if not r.dense and not r.done)
        # `prefilling`: requests still reading their prompt for experts (dense ones never do).
        assert c["prefilling"] == sum(1 for r in live.values() if not r.dense and not r.done)
        cap = c["slot_capacity"]
        assert cap >= len(live) and cap % MAX_SEQS == 0 and (cap // MAX_SEQS) & (cap // MAX_SEQS - 1) == 0
        slots = [state.requests[rid].slot for rid in live]
        assert len(set(slots)) == len(slots) and all(0 <= s < cap for s in slots)
        assert state.restarts == self.restarts
        assert (state.prefix_hits, state.prefix_hit_tokens) == (self.prefix_hits, self.prefix_hit_tokens)
        for rid, req in live.items():
            if req.dense or not req.done:
                with pytest.raises(ValueError, match="no experts yet"):
                    state.experts_of(rid)
                continue
            got = state.experts_of(rid)
            for layer, want in enumerate(req.want_experts()):
                if want is None:
                    EVENTS["near-tie skipped"] += 1
                    continue
                assert got[layer].tolist() == want, (rid, layer)
                mask = state.masks[layer, state.requests[rid].slot].nonzero().flatten().tolist()
                assert mask == want, (rid, layer)
                EVENTS["experts checked"] += 1
                if cap > MAX_SEQS:
                    EVENTS["experts checked after growth"] += 1


def test_lifecycle_state_machine():
    EVENTS.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend (5x slower on a busy machine)
    try:
        run_state_machine_as_test(Lifecycle, settings=settings(
            max_examples=100, stateful_step_count=40, deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]))
    finally:
        torch.set_num_threads(threads)
    # The runs reached the cases this test is for (derandomized: the same ones every time).
    for event in ("prefix hit", "block evicted", "resumed", "resumed mid-prompt", "1-token last chunk",
                  "preempted mid-prompt", "preempted decoding", "released before scheduled",
                  "released while preempted", "aborted mid-prompt", "released decoding", "released twice",
                  "tables grown", "mixed prompt and decode rows", "experts checked after growth",
                  "hit on blocks filled in the same step", "recompute spans prompt and outputs"):
        assert EVENTS[event] > 0, (event, sorted(EVENTS.items()))
    assert EVENTS["experts checked"] > 20 * max(1, EVENTS["near-tie skipped"]), dict(EVENTS)


class Script:
    """Stands in for hypothesis' ``data`` to drive the machine through one chosen sequence:
    each draw takes the answer given for its label (default: the strategy's simplest
    choice is not needed here, every label the scenario meets is answered)."""

    def __init__(self, **answers):
        self.answers = {key.replace("_", " "): value for key, value in answers.items()}

    def draw(self, strategy, label=None):
        return self.answers[label]


def test_preempted_mid_prompt_then_resumed_from_a_hit_past_its_own_count():
    """A rare interleaving, driven by hand through the same model: a is preempted after
    6 prompt tokens, b (same prompt) computes 16 of them, a resumes from b's 4 cached
    blocks (16 > 6: its statistic restarts from the block rows) and selects the experts
    of its whole prompt."""
    m = Lifecycle()
    m.init(with_blocks=True)
    m.agrees_with_the_model()

    def step(**answers):
        m.step(Script(order=[r for r in m.reqs if m.reqs[r].running], **answers))
        m.agrees_with_the_model()

    m.add_request(family=1, prompt_len=20, data=Script(shared=20), dense=False)
    step(schedule_r0=True, chunk_r0=6)
    m.preempt(Script(preempt="r0"))
    m.agrees_with_the_model()
    m.add_request(family=1, prompt_len=20, data=Script(**{"extends an earlier prompt": True},
                                                      earlier_prompt=m.prompts[0], shared=20), dense=False)
    step(schedule_r0=False, schedule_r1=True, chunk_r1=12)  # r1 hits r0's first block, computes to 16
    assert m.reqs["r1"].computed == 16
    step(schedule_r1=False, schedule_r0=True, chunk_r0=4)   # r0 resumes at 16, finishes its prompt
    assert m.reqs["r0"].done and m.state.prefix_hits == 2 and m.state.prefix_hit_tokens == 4 + 16
    assert m.reqs["r0"].oracle is not None  # its experts were compared with the whole prompt's
