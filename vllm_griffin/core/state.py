"""Per-request GRIFFIN state, kept beside vLLM's persistent batch.

Lifecycle of one request (all of it lives in :class:`GriffinState`):

1. *admit*   -- first time a step schedules it: a slot in the expert table,
   its density/method resolved from the engine config and its extra_args.
2. *capture* -- every prompt token's contribution is added, exactly once, into
   an fp32 accumulator (chunked prefill adds chunk after chunk; a recompute
   after preemption re-runs tokens already counted and they are skipped).
3. *select*  -- in the step whose chunk completes the prompt, each layer picks
   its top-k right after capturing, into ``experts[layer, slot, :k]``.
4. *decode*  -- every later token of the request runs only those experts
   (also output tokens recomputed after a preemption).
4b. *refresh* -- with ``refresh = R > 0``: every R-th generated token runs the
   full MLP instead, its contribution joins the accumulator (weighted R: it
   stands for the R tokens since the last one) and the experts are re-selected
   after that step. Such a request keeps its accumulator until release, and the
   experts each earlier stretch of its output ran on (packed bits on the host),
   so a recompute after preemption runs every token as it first ran.
5. *release* -- when vLLM drops the request (finished or aborted); a
   preempted request keeps its slot and experts.

vLLM moves requests between batch rows from step to step, so nothing here is
keyed by row: each step, :meth:`GriffinState.plan_step` turns the rows of that
step into token-index tensors (:class:`StepPlan`) that the layers read.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_griffin.core import algorithm
from vllm_griffin.core.config import GriffinConfig, GriffinConfigError, RequestOptions, parse_request_options
from vllm_griffin.ops import capture as capture_ops
from vllm_griffin.ops import dispatch

logger = logging.getLogger("vllm.griffin.state")


@dataclass
class StepRow:
    """One batch row of a step, as the model runner sees it."""

    req_id: str
    prompt_len: int
    num_computed: int      # tokens with KV before this step
    num_scheduled: int     # tokens this step runs
    extra_args: Mapping[str, Any] | None = None
    seed: int | None = None
    # KV block ids of the request (prefix caching on, while its prompt runs): the
    # per-block statistic rows its prompt tokens fill, or a cache hit reads.
    block_ids: Sequence[int] | None = None
    # The row's token ids, prompt then output, up to its last verified token (speculative drafts
    # are not included; a view of the runner's array, read only for requests with a loop guard).
    token_ids: Sequence[int] | None = None


@dataclass
class RequestState:
    req_id: str
    slot: int
    prompt_len: int
    density: float
    method: str
    # Experts per layer that this tensor-parallel rank runs (without TP: all of
    # them). Under TP's global top-k: the global k until selection, then this rank's share.
    k: tuple[int, ...]
    dense: bool                  # density 1.0: runs the full MLP throughout
    seed: int
    # Experts per layer that selection picks (the global k under TP's global top-k).
    select_k: tuple[int, ...] = ()
    refresh: int = 0             # a dense, captured token every `refresh` generated tokens (0: never)
    loop_guard: int = 0          # also refresh where the output's last `loop_guard` tokens repeat (0: never)
    # `gated`: experts each token keeps per layer, within its pool (the table's k); None otherwise.
    token_k: tuple[int, ...] | None = None
    refreshed: int = -1          # position of the last token captured for a refresh
    captured: int = 0            # prompt tokens already in the accumulator
    selected: bool = False
    acc_slot: int | None = None
    last_start: int = -1         # first token of its last scheduled row (resume detection)
    # A refreshing request: the position from which the table's experts apply, and the
    # earlier stretches of its output as (first position, experts as packed bits [L, D/8] on
    # the host, k per layer), oldest first; a recompute after preemption reads them.
    epoch_start: int = 0
    past_epochs: list = field(default_factory=list)
    epoch_starts: list = field(default_factory=list)  # the past epochs' first positions
    repeats: algorithm.RepeatFinder | None = None  # the loop guard's n-grams of the output

    @property
    def refresh_positions(self) -> list[int]:
        """The positions that refreshed, ascending: each started the next stretch of experts."""
        return [start - 1 for start in (*self.epoch_starts[1:], self.epoch_start)] if self.epoch_starts else []

    @property
    def refreshing(self) -> bool:
        """Refreshes may happen: the request keeps its statistic and its earlier experts."""
        return bool(self.refresh or self.loop_guard)


@dataclass(frozen=True)
class TensorParallel:
    """This rank's share of the FF neurons and the collectives that keep selection exact.

    Rank ``rank`` holds neurons ``[rank * width, (rank + 1) * width)`` of every layer.
    ``selection``: ``"global"`` (default) picks each layer's top-k over all neurons,
    the experts one device would pick, and each rank keeps those in its slice
    (counts differ per rank); ``"per_rank"`` picks ``floor(density * width)`` on
    each rank from its own slice (balanced work; not the paper's selection).
    """

    rank: int
    size: int
    all_reduce: Callable[[torch.Tensor], torch.Tensor]  # sum over the ranks
    all_gather: Callable[[torch.Tensor], torch.Tensor]  # concatenate over the ranks, last dim
    selection: str = "global"


@dataclass
class StepPlan:
    """Token indices of one step, grouped by what each layer must do with them."""

    num_tokens: int
    dense_idx: torch.Tensor | None = None      # tokens through the full MLP (None: all of them)
    # Captured tokens, one entry each (ops/capture.py's form): their positions within
    # dense_idx, their request's accumulator slot and their KV block's statistic row,
    # -1 where a token does not count for that target.
    capture_pos: torch.Tensor | None = None
    capture_slots: torch.Tensor | None = None
    capture_blocks: torch.Tensor | None = None   # None: no block rows this step
    sparse_idx: torch.Tensor | None = None     # tokens through their experts
    sparse_slot: torch.Tensor | None = None    # expert-table slot per sparse token
    # The distinct slots among them (one per request, and one per earlier stretch of a
    # refreshing request's output that a recompute replays).
    sparse_req_slots: torch.Tensor | None = None
    sparse_req_slots_host: list[int] = field(default_factory=list)
    sparse_kmax: list[int] = field(default_factory=list)  # per layer
    sparse_counts: list[torch.Tensor] = field(default_factory=list)  # per layer, [T_sparse]
    sparse_ksum: list[int] = field(default_factory=list)  # per layer: sum of the sparse tokens' k
    # `gated` tokens in the step: per layer, [T_sparse] experts each keeps in its pool (0: the
    # whole pool, a token of another method); None when the step has none.
    sparse_token_k: list[torch.Tensor] | None = None
    sparse_gated_products: list[float] = field(default_factory=list)  # per layer (see plan())
    sparse_gated_kept: list[int] = field(default_factory=list)        # per layer: experts the rows keep
    # Filled by the first layer that needs them, for every layer at once: one tensor
    # op per step instead of one per layer (the per-layer calls cost more than the
    # layer's own work in a small model).
    sparse_masks_all: torch.Tensor | None = None  # [L, T_sparse, D] bool
    sparse_unions: list[int] | None = None         # per layer: distinct neurons used
    sparse_paths: dict[bool, list[tuple[str, int | None]]] = field(default_factory=dict)
    only_sparse: bool = False                  # every token decodes on experts (a pure decode step)
    finishing: list[RequestState] = field(default_factory=list)
    captures: list[tuple[RequestState, int]] = field(default_factory=list)  # (request, new captured)
    # Staged block rows (enable_block_stats): [L, blocks, D] on the device, zeroed, that this
    # step's captures fill (capture_blocks index it), and the KV block id of each of its rows.
    block_stage: torch.Tensor | None = None
    block_stage_ids: torch.Tensor | None = None
    # Refresh tokens: (request, scratch accumulator slot the token fills, its position).
    refreshes: list[tuple[RequestState, int, int]] = field(default_factory=list)
    # Prefix-cache hits: (request, KV block ids whose statistic rows its prompt starts from).
    block_hits: list[tuple[RequestState, torch.Tensor]] = field(default_factory=list)

    @property
    def all_dense(self) -> bool:
        """No layer work beyond vLLM's own MLP (selection happens after the pass)."""
        return self.sparse_idx is None and self.capture_pos is None


class SlotPool:
    """Free list of integer slots that doubles its capacity when it runs out. A slot
    released twice or never handed out is a bookkeeping bug: it raises."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))  # lowest slot handed out first
        self._free_set = set(self._free)

    def acquire(self) -> tuple[int, bool]:
        grew = False
        if not self._free:
            old, self.capacity = self.capacity, self.capacity * 2
            self._free = list(range(self.capacity - 1, old - 1, -1))
            self._free_set.update(self._free)
            grew = True
        slot = self._free.pop()
        self._free_set.discard(slot)
        return slot, grew

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.capacity or slot in self._free_set:
            raise ValueError(f"slot {slot} is not in use (capacity {self.capacity})")
        self._free.append(slot)
        self._free_set.add(slot)

    def is_free(self, slot: int) -> bool:
        return slot in self._free_set

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)


class GriffinState:
    def __init__(
        self,
        config: GriffinConfig,
        num_layers: int,
        width: int,
        device: torch.device,
        max_seqs: int,
        export_dir: str | os.PathLike | None = None,
        export_enabled: bool = True,
        tp: TensorParallel | None = None,
    ):
        config.check_num_layers(num_layers)
        self.config = config
        self.num_layers = num_layers
        self.width = width  # neurons per layer on this rank
        self.tp = tp
        self.global_tp = tp is not None and tp.selection == "global"
        self.full_width = width * (tp.size if tp else 1)
        self.neuron_offset = width * tp.rank if tp else 0
        self._full_static_scores: torch.Tensor | None = None
        self.device = device
        self.layer_densities = config.layer_densities(num_layers)
        # [L, D] scores of the static magnitude baseline, filled as weights load.
        self.static_scores = torch.zeros(num_layers, width, dtype=torch.float32, device=device)
        # [L, D] squared column norms of each down projection (topk_down*), filled as weights load.
        self.down_norms_sq = torch.ones(num_layers, width, dtype=torch.float32, device=device)
        self._full_down_norms_sq: torch.Tensor | None = None
        self.export_dir = export_dir
        self.export_enabled = export_enabled
        self.requests: dict[str, RequestState] = {}
        # Decode-path counters (layer-steps per path) and union statistics, for
        # benchmarks and metrics.
        self.path_counts: dict[str, int] = {}
        self.held_layers: Sequence[int] = range(num_layers)  # install(): those of this pipeline rank
        self.union_fraction_sum = 0.0
        self.union_samples = 0
        # Host seconds spent on the statistic and on selection (metrics; on GPUs: launch time).
        self.capture_seconds = 0.0
        self.select_seconds = 0.0
        # Engine-feature counters: requests recomputed from token 0 (preemption),
        # and decode rows carrying several tokens (speculative decoding).
        self.restarts = 0
        self.multi_token_decode_rows = 0
        self.refresh_tokens = 0  # generated tokens run dense for a refresh
        self.loop_guard_tokens = 0  # those of them that the loop guard called (off the fixed schedule)
        self._warned_gated = False
        # The runner hands each step's token ids (the loop guard reads the output); False
        # where it cannot (asynchronous scheduling, Model Runner V2): no loop guard then.
        self.token_ids_visible = True
        self._warned_guard = False
        self.slots = SlotPool(max(1, max_seqs))
        self._lent_slots: list[int] = []  # table slots lent to one step (_replay_slot)
        self._lent_acc: list[int] = []    # accumulator slots lent to one step (_scratch_slot)
        self.acc_slots = SlotPool(8)
        # [layer, slot, neuron]: each slot's experts for a layer, first k valid.
        self.experts = torch.zeros(num_layers, self.slots.capacity, width, dtype=torch.int32, device=device)
        # [layer, slot, neuron] the same experts as a mask, for the masked-dense path
        # (one byte per neuron: a gather, instead of a scatter per layer and step).
        self.masks = torch.zeros(num_layers, self.slots.capacity, width, dtype=torch.bool, device=device)
        # [layer, acc slot, neuron]: summed prompt contributions (only while prefilling).
        self.acc = torch.zeros(num_layers, self.acc_slots.capacity, width, dtype=torch.float32, device=device)
        # Prefix caching: [layer, KV block, neuron] the summed contributions of the
        # prompt tokens each KV block holds (see enable_block_stats).
        self.block_stats: torch.Tensor | None = None
        self.block_rows_written: set[int] = set()  # block rows a prompt has filled (a counter)
        self.block_stats_staged = False  # rows filled through a device buffer (enable_block_stats)
        self.block_size = 0
        self.prefix_hits = 0
        self.prefix_hit_tokens = 0
        # GPU: each selected slot's experts as packed bits [L, D/8] on the host, so the
        # dispatch counts a step's union without a device sync (see sparse_union).
        self.host_bits: dict[int, np.ndarray] = {}
        # CPU decode: a persistent flat buffer for a step's [L, T, D] bool masks (union
        # counting), so a step does not allocate and page-fault them anew.
        self._step_buffers: dict[torch.dtype, torch.Tensor] = {}
        # CUDA graphs (Model Runner V2): the per-row buffers captured decode graphs
        # read (graph_decode.GraphDecode); None when the engine runs no graphs.
        self.graph = None

    # -- prefix caching -----------------------------------------------------------------

    def block_stats_bytes(self) -> int:
        """Bytes of per-block statistic that each KV cache block needs beside it."""
        return self.num_layers * self.width * 4

    def enable_block_stats(self, num_blocks: int, block_size: int, staged: bool | None = None) -> None:
        """Keep, beside each of vLLM's ``num_blocks`` KV blocks, the statistic of the prompt
        tokens it holds, so a request whose prompt starts with cached blocks selects
        exactly the experts it would without the hit. Only blocks made of prompt tokens
        are ever shared (the scheduler side caches no others).

        The rows live in host memory, outside vLLM's KV budget (on an accelerator they
        would take a third to two thirds of it at 16-token blocks). On an accelerator
        (``staged``, the default there) a step captures into a small device buffer of
        the blocks it fills, copied to the host rows after the forward pass; a hit sums
        its rows on the host and copies one [layers, D] sum in."""
        self.block_size = block_size
        self.block_stats_staged = self.device.type != "cpu" if staged is None else staged
        pin = self.block_stats_staged and torch.cuda.is_available()
        self.block_stats = torch.zeros(self.num_layers, num_blocks, self.width, dtype=torch.float32,
                                       device="cpu", pin_memory=pin)
        logger.info("GRIFFIN: prefix caching keeps %.1f MiB of per-block expert statistic in host memory "
                    "(%d blocks, %d bytes each)", self.block_stats.numel() * 4 / 2**20, num_blocks,
                    self.block_stats_bytes())

    # -- lifecycle --------------------------------------------------------------------

    def admit(self, row: StepRow) -> RequestState:
        try:
            opts = parse_request_options(row.extra_args)
        except GriffinConfigError as exc:
            # The front end rejects these before they run; a request that got
            # here anyway (a client bypassing it) runs on the engine defaults
            # rather than taking the engine down.
            logger.error("GRIFFIN: %s; using the engine's settings for request %s", exc, row.req_id)
            opts = RequestOptions()
        method = opts.method or self.config.method
        if method in algorithm.TOKEN_GATED and (self.tp is not None or self.graph is not None):
            # Per-token selection needs every neuron's gate on one device, outside a graph.
            if not self._warned_gated:
                logger.warning("GRIFFIN: method %s does not run with tensor parallelism or CUDA graphs yet; "
                               "its requests use topk (first: %s)", method, row.req_id)
                self._warned_gated = True
            method = "topk"
        if opts.density is not None:
            densities = (opts.density,) * self.num_layers
        else:
            densities = self.layer_densities
        density = opts.density if opts.density is not None else sum(densities) / len(densities)
        dense = all(d >= 1.0 for d in densities)
        refresh = opts.refresh if opts.refresh is not None else self.config.refresh
        if refresh is None:
            refresh = algorithm.DEFAULT_REFRESH.get(method, 0)
        loop_guard = opts.loop_guard if opts.loop_guard is not None else self.config.loop_guard
        if loop_guard is None:
            loop_guard = algorithm.DEFAULT_LOOP_GUARD.get(method, 0)
        if dense or method not in algorithm.PROMPT_METHODS:
            refresh = loop_guard = 0  # nothing to refresh: no experts, or experts that ignore the text
        if loop_guard and not self.token_ids_visible:
            if not self._warned_guard:
                logger.warning("GRIFFIN: this runner does not show the output's token ids before a step "
                               "(asynchronous scheduling or Model Runner V2): no loop guard (first: %s)", row.req_id)
                self._warned_guard = True
            loop_guard = 0
        slot = self._acquire_table_slot()
        # The global top-k under TP selects over every rank's neurons.
        select_width = self.full_width if self.global_tp else self.width
        token_k = None
        if method in algorithm.TOKEN_GATED:
            pools, token_k = zip(*(algorithm.gated_sizes(d, select_width) for d in densities))
            k = tuple(pools)
        else:
            k = algorithm.layer_budgets([algorithm.num_experts(d, select_width) for d in densities], method,
                                        select_width)
        state = RequestState(
            req_id=row.req_id,
            slot=slot,
            prompt_len=row.prompt_len,
            density=density,
            method=method,
            k=k,
            select_k=k,
            dense=dense,
            seed=self.config.seed if row.seed is None else row.seed,
            refresh=refresh,
            loop_guard=loop_guard,
            repeats=algorithm.RepeatFinder(loop_guard) if loop_guard else None,
            token_k=token_k,
        )
        self.requests[row.req_id] = state
        return state

    def release(self, req_id: str) -> None:
        state = self.requests.pop(req_id, None)
        if state is None:
            return
        self._free_acc(state)
        self.slots.release(state.slot)

    @property
    def slots_in_use(self) -> int:
        """Expert-table slots the slot pool has handed out (one per live request)."""
        return self.slots.in_use

    def counters(self) -> dict[str, int]:
        """The pools and tables as they are (griffin_stats, /metrics, the tests)."""
        return {
            "requests_live": len(self.requests),
            "slots_in_use": self.slots.in_use,
            "slot_capacity": self.slots.capacity,
            "acc_in_use": self.acc_slots.in_use,
            "acc_capacity": self.acc_slots.capacity,
            "prefilling": sum(1 for s in self.requests.values() if not s.selected and not s.dense),
            "block_stat_rows": 0 if self.block_stats is None else self.block_stats.shape[1],
            "block_stat_rows_written": len(self.block_rows_written),
            # Host bytes of refreshing requests' earlier experts (kept for recomputes).
            "past_experts_bytes": sum(bits.nbytes for s in self.requests.values() for _, bits, _ in s.past_epochs),
        }

    def check_invariants(self) -> None:
        """Raise RuntimeError naming each way the pools, tables and requests disagree
        (between steps: a step's refresh scratch slots are returned in finish_step)."""
        problems = []
        slots = [s.slot for s in self.requests.values()]
        if len(set(slots)) != len(slots):
            problems.append(f"requests share slots: {sorted(slots)}")
        if any(self.slots.is_free(s) for s in slots):
            problems.append("a live request's slot is on the free list")
        if self.slots.in_use != len(self.requests):
            problems.append(f"{self.slots.in_use} slots in use for {len(self.requests)} live requests")
        accs = [s.acc_slot for s in self.requests.values() if s.acc_slot is not None]
        if len(set(accs)) != len(accs) or any(self.acc_slots.is_free(a) for a in accs):
            problems.append(f"accumulator slots shared or free: {sorted(accs)}")
        if self.acc_slots.in_use != len(accs):
            problems.append(f"{self.acc_slots.in_use} accumulator slots in use, {len(accs)} held by requests")
        if self.experts.shape[1] != self.slots.capacity or self.masks.shape[1] != self.slots.capacity:
            problems.append(f"tables have {self.experts.shape[1]} rows for {self.slots.capacity} slots")
        if self.acc.shape[1] != self.acc_slots.capacity:
            problems.append(f"accumulator has {self.acc.shape[1]} rows for {self.acc_slots.capacity} slots")
        if problems:
            raise RuntimeError("GRIFFIN state inconsistent: " + "; ".join(problems))

    # -- one step ---------------------------------------------------------------------

    def plan_step(self, rows: Sequence[StepRow]) -> StepPlan:
        self._return_lent_slots()  # a step whose forward pass failed left them lent
        dense_idx: list[int] = []
        sparse_idx: list[int] = []
        sparse_req: list[RequestState] = []
        sparse_slots: list[int] = []
        sparse_k: list[tuple[int, ...]] = []
        replays: dict[tuple[str, int], tuple[int, tuple[int, ...]]] = {}
        caps = _Captures()
        plan = StepPlan(num_tokens=sum(r.num_scheduled for r in rows))
        offset = 0
        for row in rows:
            state = self.requests.get(row.req_id) or self.admit(row)
            start, end = row.num_computed, row.num_computed + row.num_scheduled
            if 0 <= start <= state.last_start:
                # Every step moves a request forward (rejected drafts included): going
                # back means it was preempted and resumes, from 0 or from a prefix-cache hit.
                self.restarts += 1
            state.last_start = start
            if start >= state.prompt_len and row.num_scheduled > 1:
                self.multi_token_decode_rows += 1  # draft tokens: verified on the request's experts
            prompt_end = min(end, state.prompt_len)
            if state.dense or start >= state.prompt_len and not state.selected:
                # Dense requests; or (never expected) output tokens without experts:
                # the full MLP is the safe answer.
                if not state.dense:
                    logger.warning("GRIFFIN: request %s decodes before its experts exist; running dense", row.req_id)
                caps.add(self, row, state, len(dense_idx), start, prompt_end, prompt_end, None)
                dense_idx.extend(range(offset, offset + row.num_scheduled))
                offset += row.num_scheduled
                continue
            if start < prompt_end:  # prompt tokens: full MLP, captured once
                first_dense = len(dense_idx)
                dense_idx.extend(range(offset, offset + prompt_end - start))
                acc_from, acc = prompt_end, None
                if not state.selected and state.method in algorithm.PROMPT_METHODS:
                    if start > state.captured:
                        self._prefix_hit(plan, row, state, start)
                    new_from = max(start, state.captured)
                    if new_from < prompt_end:
                        acc_from, acc = new_from, self._acc_slot(state)
                        plan.captures.append((state, prompt_end))
                caps.add(self, row, state, first_dense, start, prompt_end, acc_from, acc)
                if prompt_end == state.prompt_len and not state.selected:
                    plan.finishing.append(state)
            if end > state.prompt_len:  # generated tokens: the request's experts
                for pos in range(max(start, state.prompt_len), end):
                    if state.refreshing and self._refresh_due(state, pos, row.token_ids):
                        # The full MLP for this token, its statistic into a scratch slot
                        # that finish_step folds into the request's accumulator.
                        scratch = self._scratch_slot()
                        caps.add_token(len(dense_idx), scratch)
                        plan.refreshes.append((state, scratch, pos))
                        dense_idx.append(offset + pos - start)
                    elif state.refreshing and self._refreshed_before(state, pos):
                        # A recompute after preemption: this token refreshed when it first ran
                        # (full MLP, already counted); it runs the same way, uncounted.
                        dense_idx.append(offset + pos - start)
                    else:
                        slot, k = state.slot, state.k
                        if pos < state.epoch_start:  # recomputed on the experts it first ran on
                            slot, k = self._replay_slot(replays, state, pos)
                        sparse_idx.append(offset + pos - start)
                        sparse_req.append(state)
                        sparse_slots.append(slot)
                        sparse_k.append(k)
            offset += row.num_scheduled

        to = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        if sparse_idx:  # else every token is dense and dense_idx stays None
            plan.dense_idx = to(dense_idx)
        caps.fill(plan, self, to)
        if sparse_idx:
            plan.only_sparse = not dense_idx
            plan.sparse_idx = to(sparse_idx)
            plan.sparse_slot = to(sparse_slots)
            distinct = {s.req_id: s for s in sparse_req}.values()
            plan.sparse_req_slots_host = list(dict.fromkeys(sparse_slots))
            plan.sparse_req_slots = to(plan.sparse_req_slots_host)
            # Per layer and token, in array ops (a Python loop over L x T costs ~0.3 ms a step).
            # [L, T], C order: each layer's row is handed to the kernels as a contiguous array.
            k = np.ascontiguousarray(np.array(sparse_k, dtype=np.int64).T)
            plan.sparse_kmax = k.max(axis=1).tolist()
            plan.sparse_ksum = k.sum(axis=1).tolist()
            # One host-to-device copy for all layers (rows of one [L, T] tensor).
            plan.sparse_counts = list(torch.from_numpy(k).to(self.device))
            if any(s.token_k is not None for s in distinct):
                zeros = (0,) * self.num_layers
                gk = np.ascontiguousarray(np.array([s.token_k or zeros for s in sparse_req], dtype=np.int64).T)
                plan.sparse_token_k = list(torch.from_numpy(gk).to(self.device))
                # Per layer, for the cost model: weight rows the gated kernel reads (a gated row
                # its pool's gates and k up and down rows; another row all three of its experts),
                # in units of one neuron's three rows, and how many experts the rows keep.
                plan.sparse_gated_products = np.where(gk > 0, (k + 2 * gk) / 3, k).sum(axis=1).tolist()
                plan.sparse_gated_kept = np.where(gk > 0, gk, k).sum(axis=1).tolist()
        return plan

    def _refresh_due(self, state: RequestState, pos: int, token_ids: Sequence[int] | None) -> bool:
        """Whether the generated token at ``pos`` refreshes: every ``refresh``-th one after
        the first, and (loop guard) one that repeats an earlier run of the output; once per
        position (tokens recomputed after a preemption were counted)."""
        generated = pos - state.prompt_len
        if not state.selected or pos <= state.refreshed or generated <= 0:
            return False
        if state.refresh and generated % state.refresh == 0:
            return True
        if state.repeats is None or token_ids is None or pos >= len(token_ids):
            return False  # no token ids (a runner without them: see admit), or a speculative draft
        return state.repeats.repeats(token_ids[state.prompt_len: pos + 1], generated)

    def _refreshed_before(self, state: RequestState, pos: int) -> bool:
        """Whether the generated token at ``pos`` refreshed when it first ran."""
        if pos > state.refreshed:  # a token past the last refresh (every new one): no lookup
            return False
        refreshed = state.refresh_positions
        i = bisect.bisect_left(refreshed, pos)
        return i < len(refreshed) and refreshed[i] == pos

    def _replay_slot(self, replays: dict, state: RequestState, pos: int) -> tuple[int, tuple[int, ...]]:
        """A table slot holding the experts the token at ``pos`` first ran on (an earlier
        stretch of a refreshing request's output), lent until the step ends; and their k."""
        starts = state.epoch_starts
        epoch = bisect.bisect_right(starts, pos) - 1
        if epoch < 0:
            raise RuntimeError(f"GRIFFIN: request {state.req_id} recomputes position {pos}, "
                               f"before its first experts (from {starts[:1] or state.epoch_start})")
        key = (state.req_id, epoch)
        if key not in replays:
            _, bits, k = state.past_epochs[epoch]
            slot = self._acquire_table_slot()
            self._lent_slots.append(slot)
            masks = torch.from_numpy(np.unpackbits(bits, axis=-1, count=self.width).astype(bool))
            self.masks[:, slot] = masks.to(self.device)
            for layer in range(self.num_layers):
                # Ascending, as selection stores them (the kernels sum in this order).
                idx = masks[layer].nonzero().flatten()
                self.experts[layer, slot, : idx.numel()] = idx.to(device=self.device, dtype=torch.int32)
            self.host_bits[slot] = bits
            replays[key] = (slot, k)
        return replays[key]

    def _return_lent_slots(self) -> None:
        """Give back what one step borrowed: table slots for replayed experts, accumulator
        slots for refresh tokens (folded in by finish_step, or dropped with a failed step)."""
        for slot in self._lent_slots:
            self.slots.release(slot)
        for slot in self._lent_acc:
            self.acc_slots.release(slot)
        self._lent_slots.clear()
        self._lent_acc.clear()

    def _acquire_table_slot(self) -> int:
        slot, grew = self.slots.acquire()
        if grew:
            self.experts = _grow(self.experts, self.slots.capacity)
            self.masks = _grow(self.masks, self.slots.capacity)
        return slot

    def _scratch_slot(self) -> int:
        slot, grew = self.acc_slots.acquire()
        if grew:
            self.acc = _grow(self.acc, self.acc_slots.capacity)
        self.acc[:, slot].zero_()
        self._lent_acc.append(slot)
        return slot

    def _prefix_hit(self, plan: StepPlan, row: StepRow, state: RequestState, start: int) -> None:
        """The request's prompt starts ``start`` tokens in (vLLM's prefix cache had them):
        its statistic starts from the cached blocks' rows instead of its own tokens."""
        if self.block_stats is None or row.block_ids is None or start % self.block_size:
            raise RuntimeError(
                f"GRIFFIN: request {row.req_id} skipped prompt tokens {state.captured}..{start - 1} "
                "(prefix cache hit?); its statistic would be incomplete")
        acc = self._acc_slot(state)
        # Everything before `start` comes from the blocks (also tokens this request
        # counted before a preemption); the rows are read after the forward pass,
        # when blocks other requests fill in this same step are complete.
        self.acc[:, acc].zero_()
        blocks = torch.tensor(list(row.block_ids[: start // self.block_size]), dtype=torch.long)
        plan.block_hits.append((state, blocks))
        state.captured = start
        self.prefix_hits += 1
        self.prefix_hit_tokens += start

    def capture(self, layer: int, z: torch.Tensor, plan: StepPlan) -> None:
        """Add the captured tokens' contributions into the accumulator (and the KV blocks'
        rows). ``z`` holds the activations of the step's dense tokens; ``plan.capture_pos``
        picks the captured ones."""
        start = time.perf_counter()
        sq_norms = None
        if self.tp is not None:
            # This rank holds a slice of each z_t; the norm runs over every rank's neurons.
            sq_norms = self.tp.all_reduce(capture_ops.capture_sq_norms(z, plan.capture_pos))
        blocks = None
        if plan.capture_blocks is not None:
            blocks = plan.block_stage[layer] if plan.block_stage is not None else self.block_stats[layer]
        # The plan's indices are built in range (positions among the dense tokens, pool
        # slots, KV block ids): not checked again in every layer.
        capture_ops.capture_statistic(z, plan.capture_pos, self.acc[layer], plan.capture_slots,
                                      blocks, plan.capture_blocks, sq_norms, trusted_indices=True)
        self.capture_seconds += time.perf_counter() - start

    def select(self, finishing: list[RequestState]) -> dict[str, list[torch.Tensor]]:
        """Pick every layer's experts for ``finishing``: the requests whose prompt completed
        this step, and those that refreshed.

        Runs once after the forward pass, so the paper's top-k is one batched call
        for all layers and requests.
        Returns each request's experts per layer as global neuron indices (what
        an export writes; under tensor parallelism this rank keeps only its slice).
        """
        acc, static, width = self.acc, self.static_scores, self.width
        acc_pos = {s.acc_slot: s.acc_slot for s in finishing if s.acc_slot is not None}
        if self.global_tp:
            # Every rank sees the whole statistic, picks the same global experts and
            # keeps those in its own slice. Same plan on every rank: same collectives.
            slots = sorted(acc_pos)
            acc_pos = {slot: i for i, slot in enumerate(slots)}
            if slots:
                acc = self.tp.all_gather(self.acc[:, slots].contiguous())
            static, width = self._all_static_scores(finishing), self.full_width
            if self._full_static_scores is None and any(s.method in algorithm.PRIOR_MIXED for s in finishing):
                # topk_magnitude mixes the magnitude prior over all neurons (gathered once).
                self._full_static_scores = static = self.tp.all_gather(self.static_scores.contiguous())
        chosen: dict[str, list[torch.Tensor | None]] = {s.req_id: [None] * self.num_layers for s in finishing}
        down_sq = self._all_down_norms_sq(finishing) if self.global_tp else self.down_norms_sq
        topk_groups: dict[tuple[int, str], list[tuple[int, RequestState]]] = {}
        for state in finishing:
            for layer, k in enumerate(state.select_k):
                if state.method in algorithm.RANK_METHODS:
                    topk_groups.setdefault((k, state.method), []).append((layer, state))
                    continue
                stat = acc[layer, acc_pos[state.acc_slot]] if state.acc_slot is not None else None
                gen = torch.Generator(device="cpu")
                gen.manual_seed(algorithm.layer_seed(state.seed, layer))
                chosen[state.req_id][layer] = algorithm.select_experts(
                    stat, k, state.method, width=width, generator=gen, static_scores=static[layer])
        for (k, method), pairs in topk_groups.items():
            layers = torch.tensor([layer for layer, _ in pairs], device=self.device)
            rows = torch.tensor([acc_pos[s.acc_slot] for _, s in pairs], device=self.device)
            scores = algorithm.rank_scores(acc[layers, rows], method, down_sq[layers], static[layers])
            idx, masks = algorithm.topk_experts_and_masks(scores, k)
            if self.tp is None:  # the common case: one batched write
                slots = torch.tensor([s.slot for _, s in pairs], device=self.device)
                self.experts[layers, slots, :k] = idx.to(torch.int32)
                self.masks[layers, slots] = masks
            for (layer, state), row in zip(pairs, idx):
                chosen[state.req_id][layer] = row
        if self.tp is None:
            for state in finishing:
                if state.method not in algorithm.RANK_METHODS:
                    for layer, idx in enumerate(chosen[state.req_id]):
                        self._store(layer, state, idx)
            return chosen
        if self.global_tp:
            counts = []
            for state in finishing:
                mine = [self._store_slice(layer, state, idx) for layer, idx in enumerate(chosen[state.req_id])]
                counts.append((state, tuple(mine)))
            for state, mine in counts:
                state.k = mine
            return chosen
        # Balanced per-rank selection: each rank picked from its own slice.
        for state in finishing:
            for layer, idx in enumerate(chosen[state.req_id]):
                self._store(layer, state, idx)
        return self._gather_per_rank(finishing, chosen) if self.export_dir else chosen

    def _store(self, layer: int, state: RequestState, idx: torch.Tensor) -> None:
        """Write one layer's experts (indices into this rank's neurons) into the tables."""
        self.experts[layer, state.slot, : idx.numel()] = idx.to(torch.int32)
        self.masks[layer, state.slot] = False
        self.masks[layer, state.slot, idx] = True

    def _store_slice(self, layer: int, state: RequestState, global_idx: torch.Tensor) -> int:
        """Keep the global experts that fall in this rank's slice; returns how many."""
        lo, hi = self.neuron_offset, self.neuron_offset + self.width
        local = global_idx[(global_idx >= lo) & (global_idx < hi)] - lo
        self._store(layer, state, local)
        return int(local.numel())

    def _all_static_scores(self, finishing: list[RequestState]) -> torch.Tensor:
        """[L, all neurons] magnitude scores, gathered once over the TP ranks (when needed)."""
        if self._full_static_scores is None and any(s.method == "magnitude" for s in finishing):
            self._full_static_scores = self.tp.all_gather(self.static_scores.contiguous())
        return self._full_static_scores if self._full_static_scores is not None else self.static_scores

    def _all_down_norms_sq(self, finishing: list[RequestState]) -> torch.Tensor:
        """[L, all neurons] squared down-projection column norms, gathered once over the TP ranks."""
        if self._full_down_norms_sq is None and any(s.method in algorithm.DOWN_WEIGHTED for s in finishing):
            self._full_down_norms_sq = self.tp.all_gather(self.down_norms_sq.contiguous())
        return self._full_down_norms_sq if self._full_down_norms_sq is not None else self.down_norms_sq

    def _gather_per_rank(self, finishing, chosen):
        """Global indices of per-rank selections (every rank picked the same count)."""
        out = {}
        for state in finishing:
            per_layer = []
            for idx in chosen[state.req_id]:
                everyone = self.tp.all_gather((idx + self.neuron_offset).unsqueeze(0))[0]
                per_layer.append(everyone.sort().values)
            out[state.req_id] = per_layer
        return out

    def sparse_masks(self, layer: int, plan: StepPlan) -> torch.Tensor:
        """[T, D] bool: which neurons each of the step's sparse tokens keeps at ``layer``."""
        if self.device.type != "cpu":
            # A GPU gathers per layer: all layers at once would be [L, T, D] of device
            # memory at once (hundreds of MiB for an 8B model at a few hundred rows).
            return self.masks[layer].index_select(0, plan.sparse_slot)
        if plan.sparse_masks_all is None:
            out = self._step_buffer(torch.bool, self.num_layers, plan.sparse_slot.numel(), self.width)
            plan.sparse_masks_all = torch.index_select(self.masks, 1, plan.sparse_slot, out=out)
        return plan.sparse_masks_all[layer]

    def _step_buffer(self, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        """A contiguous view of a buffer kept across steps (grown when needed): no fresh
        allocation and page faults per step."""
        size = math.prod(shape)
        buf = self._step_buffers.get(dtype)
        if buf is None or buf.numel() < size:
            buf = self._step_buffers[dtype] = torch.empty(2 * size, dtype=dtype, device=self.device)
        return buf[:size].view(*shape)

    def decode_paths(self, plan: StepPlan, kernel_ok: bool, device: torch.device) -> list[tuple[str, int | None]]:
        """Per layer, (the path ops.dispatch picks for the step's sparse rows, their union
        size where it was counted). Decided for every layer at the first call of a step."""
        paths = plan.sparse_paths.get(kernel_ok)
        if paths is not None:
            return paths
        rows, paths = plan.sparse_idx.numel(), []
        # Rows of the step that run the full MLP (refresh tokens, prompt chunks): without tensor
        # parallelism the layer can run the masked path in one pass with them (GriffinMLP.run),
        # the weights streamed once. Under TP every rank must reduce the same number of times
        # whatever path its own counts pick, so there the passes stay apart.
        shared = len(plan.dense_idx) if plan.dense_idx is not None and self.tp is None else 0
        can_win: dict[tuple[int, int], bool] = {}  # layers mostly share (kmax, products): ask once
        for layer in range(self.num_layers):
            if plan.sparse_token_k is not None:
                paths.append(self._gated_path(layer, plan, kernel_ok, device, shared))
                continue
            products, kmax = plan.sparse_ksum[layer], plan.sparse_kmax[layer]
            if kmax == 0:
                # Under TP's global top-k a rank may hold none of these rows' experts:
                # the masked GEMMs still add the bias and join the all-reduce.
                paths.append(("masked", None))
                continue
            if kernel_ok and (kmax, products) not in can_win:
                can_win[kmax, products] = dispatch.kernel_can_win(device, rows, self.width, kmax, products,
                                                                  dense_rows=shared)
            if kernel_ok and not can_win[kmax, products]:
                paths.append(("masked", None))  # even the smallest union loses: no need to count it
            else:
                union = self.sparse_union(layer, plan)
                paths.append((dispatch.choose_path(device, kernel_ok, rows, self.width, union, products,
                                                   dense_rows=shared), union))
        plan.sparse_paths[kernel_ok] = paths
        # Counted once per step for the layers this rank runs (not once per layer call).
        for layer in self.held_layers:
            path, union = paths[layer]
            self.path_counts[path] = self.path_counts.get(path, 0) + 1
            if rows > 1 and union is not None:
                self.union_fraction_sum += union / self.width
                self.union_samples += 1
        return paths

    def _gated_path(self, layer: int, plan: StepPlan, kernel_ok: bool, device: torch.device,
                    shared: int = 0) -> tuple[str, int | None]:
        """A step with `gated` rows: the CPU gated kernel (rows or union order) where the cost
        model says it beats vLLM's GEMMs with per-row masks, which run it elsewhere."""
        if not kernel_ok or device.type != "cpu":
            return "masked", None
        pools = self.sparse_union(layer, plan)  # distinct pool neurons: the gates read
        # Up and down rows of at most the pools' union: an upper bound on the weight traffic.
        union = (pools + 2 * min(pools, plan.sparse_gated_kept[layer])) // 3
        path = dispatch.choose_path(device, True, plan.sparse_idx.numel(), self.width, union,
                                    round(plan.sparse_gated_products[layer]), dense_rows=shared)
        return ("masked" if path == "masked" else f"gated_{path}"), pools

    def sparse_union(self, layer: int, plan: StepPlan) -> int:
        """Distinct neurons the step's sparse requests use at ``layer``, counted on the host
        for every layer at the first call: from the step's one-byte masks on a CPU (far
        cheaper than scattering the expert lists), from the packed copies made at
        selection on a GPU (no device sync per step)."""
        if plan.sparse_req_slots.numel() == 1:
            return plan.sparse_kmax[layer]
        if plan.sparse_unions is None:
            if self.device.type == "cpu":
                self.sparse_masks(0, plan)  # [L, T, D] for the step; a request's tokens share a row's masks
                used = plan.sparse_masks_all.view(torch.uint8).amax(dim=1)
                plan.sparse_unions = torch.count_nonzero(used, dim=-1).tolist()
            else:
                plan.sparse_unions = self.host_unions(plan.sparse_req_slots_host)
        return plan.sparse_unions[layer]

    def host_unions(self, slots: Sequence[int]) -> list[int]:
        """Per layer, the union size of these slots' experts from their packed host copies."""
        bits = np.bitwise_or.reduce(np.stack([self.host_bits[s] for s in slots]), axis=0)  # [L, D/8]
        return _POPCOUNT[bits].sum(axis=-1).tolist()

    def _keep_host_bits(self, finishing: list[RequestState]) -> None:
        # One device-to-host copy per selection step (the V1 runner syncs every step anyway).
        slots = torch.tensor([s.slot for s in finishing], device=self.device)
        packed = np.packbits(self.masks[:, slots].cpu().numpy(), axis=-1)  # [L, R, D/8]
        for i, state in enumerate(finishing):
            self.host_bits[state.slot] = packed[:, i]

    def sparse_experts(self, layer: int, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts [T, kmax] int64, counts [T]) of the step's sparse tokens for ``layer``."""
        kmax = plan.sparse_kmax[layer]
        experts = self.experts[layer, plan.sparse_slot, :kmax].long()
        return experts, plan.sparse_counts[layer]

    def finish_step(self, plan: StepPlan) -> None:
        """Commit what the step's forward pass did (it succeeded); select finished prompts' experts."""
        for state, captured in plan.captures:
            state.captured = max(state.captured, captured)
        if plan.block_stage is not None:  # the step's block rows, from the device buffer to the host
            self.block_stats.index_add_(1, plan.block_stage_ids, plan.block_stage.cpu())
        for state, blocks in plan.block_hits:
            self.acc[:, state.acc_slot] += self.block_stats[:, blocks].sum(dim=1).to(self.device)
        refreshed = []
        for state, scratch, pos in plan.refreshes:
            self.refresh_tokens += 1
            if not state.refresh or (pos - state.prompt_len) % state.refresh:
                self.loop_guard_tokens += 1
            if state.req_id not in self.requests:  # released meanwhile: nothing to fold into
                continue
            # decay * what it had + the token, standing for the tokens generated since the last one.
            since = pos - max(state.refreshed, state.prompt_len)
            self.acc[:, state.acc_slot].mul_(algorithm.REFRESH_DECAY).add_(self.acc[:, scratch], alpha=since)
            state.refreshed = pos
            refreshed.append(state)
        self._return_lent_slots()
        for state in refreshed:
            # The experts that ran until now, kept for a recompute after preemption.
            state.past_epochs.append((state.epoch_start, self._packed_experts(state), state.k))
            state.epoch_starts.append(state.epoch_start)
            state.epoch_start = state.refreshed + 1
        for state in plan.finishing:
            state.epoch_start = state.prompt_len
        selecting = plan.finishing + refreshed
        chosen = {}
        if selecting:
            start = time.perf_counter()
            chosen = self.select(selecting)
            self.select_seconds += time.perf_counter() - start
        if selecting and self.device.type != "cpu":
            self._keep_host_bits(selecting)
        for state in plan.finishing:
            state.selected = True
            if self.export_dir and self.export_enabled:
                # The statistic too (one device's whole one): it tells a float near-tie at the
                # top-k boundary from a wrong count when two runs' experts differ.
                statistic = None
                if self.tp is None and state.acc_slot is not None:
                    statistic = self.acc[:, state.acc_slot].cpu().clone()
                self.export(state, [idx.sort().values.to(torch.int32).cpu() for idx in chosen[state.req_id]],
                            statistic)
            if not state.refreshing:  # a refreshing request keeps its statistic
                self._free_acc(state)

    def _packed_experts(self, state: RequestState) -> np.ndarray:
        """The request's current experts as packed bits [L, D/8] on the host."""
        if self.device.type != "cpu" and state.slot in self.host_bits:
            return np.ascontiguousarray(self.host_bits[state.slot])  # kept at selection: no device sync
        return np.packbits(self.masks[:, state.slot].cpu().numpy(), axis=-1)

    def experts_of(self, req_id: str) -> list[torch.Tensor]:
        """The selected experts of a live request on this rank, one sorted int32 tensor per layer
        (indices into this rank's neurons under tensor parallelism)."""
        state = self.requests[req_id]
        if not state.selected:
            raise ValueError(f"request {req_id} has no experts yet")
        return [self.experts[layer, state.slot, : state.k[layer]].cpu().clone() for layer in range(self.num_layers)]

    def export(self, state: RequestState, experts: list[torch.Tensor] | None = None,
               statistic: torch.Tensor | None = None) -> None:
        """Write the request's experts (global indices; default: this rank's table)."""
        from vllm_griffin.core.export import write_experts

        write_experts(self.export_dir, state, experts if experts is not None else self.experts_of(state.req_id),
                      statistic)

    # -- internals --------------------------------------------------------------------

    def _acc_slot(self, state: RequestState) -> int:
        if state.acc_slot is None:
            state.acc_slot, grew = self.acc_slots.acquire()
            if grew:
                self.acc = _grow(self.acc, self.acc_slots.capacity)
            self.acc[:, state.acc_slot].zero_()
        return state.acc_slot

    def _free_acc(self, state: RequestState) -> None:
        if state.acc_slot is not None:
            self.acc_slots.release(state.acc_slot)
            state.acc_slot = None


class _Captures:
    """The step's captured tokens, one entry each: where they sit among the dense
    tokens, and which accumulator slot and KV block statistic row they add to (-1: none)."""

    def __init__(self):
        self.pos: list[int] = []        # positions within the dense tokens
        self.slots: list[int] = []      # accumulator slot, or -1
        self.blocks: list[int] = []     # block-statistic row, or -1
        self.zero_rows: list[int] = []  # blocks filled from their first token: start from zero

    def add(self, state_tbl: GriffinState, row: StepRow, state: RequestState, first_dense: int,
            start: int, prompt_end: int, acc_from: int, acc: int | None) -> None:
        """Prompt tokens ``start..prompt_end`` of ``row`` sit at dense positions from
        ``first_dense``; those from ``acc_from`` count for the request's statistic."""
        if prompt_end <= start:
            # No prompt token in this step (a dense request decoding): nothing to capture.
            # Without this, `hi` below became `start` and added positions before the row's own.
            return
        blk_end = start
        if state_tbl.block_stats is not None and row.block_ids is not None:
            # Only blocks made entirely of prompt tokens can be shared.
            blk_end = min(prompt_end, state.prompt_len // state_tbl.block_size * state_tbl.block_size)
        lo = min(acc_from, start if blk_end > start else prompt_end)
        hi = max(prompt_end if acc_from < prompt_end else lo, blk_end)
        if lo >= hi:
            return
        size = state_tbl.block_size
        self.pos.extend(range(first_dense + lo - start, first_dense + hi - start))
        self.slots.extend(acc if acc is not None and p >= acc_from else -1 for p in range(lo, hi))
        self.blocks.extend(row.block_ids[p // size] if p < blk_end else -1 for p in range(lo, hi))
        if blk_end > start:
            first_block = -(-start // size)
            self.zero_rows.extend(row.block_ids[b] for b in range(first_block, -(-blk_end // size)))

    def add_token(self, dense_pos: int, slot: int) -> None:
        """One generated token (a refresh) at ``dense_pos`` among the dense tokens, into ``slot``."""
        self.pos.append(dense_pos)
        self.slots.append(slot)
        self.blocks.append(-1)

    def fill(self, plan: StepPlan, state_tbl: GriffinState, to) -> None:
        if not self.pos:
            return
        plan.capture_pos, plan.capture_slots = to(self.pos), to(self.slots)
        if self.zero_rows:
            # A block filled from its first token holds new content (vLLM reuses blocks).
            state_tbl.block_stats[:, torch.tensor(self.zero_rows, dtype=torch.long)] = 0
            state_tbl.block_rows_written.update(self.zero_rows)
        if any(b >= 0 for b in self.blocks):
            if not state_tbl.block_stats_staged:
                plan.capture_blocks = to(self.blocks)
                return
            # Rows of the blocks this step fills, in a device buffer added to the host rows
            # by finish_step (a block continued from an earlier chunk keeps what it had).
            ids = sorted({b for b in self.blocks if b >= 0})
            row_of = {b: i for i, b in enumerate(ids)}
            plan.capture_blocks = to([row_of.get(b, -1) for b in self.blocks])
            plan.block_stage_ids = torch.tensor(ids, dtype=torch.long)
            plan.block_stage = torch.zeros(state_tbl.num_layers, len(ids), state_tbl.width,
                                           dtype=torch.float32, device=state_tbl.device)


# Set bits of each byte value (popcount of packed masks).
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)


def _grow(table: torch.Tensor, capacity: int) -> torch.Tensor:
    grown = table.new_zeros(table.shape[0], capacity, *table.shape[2:])
    grown[:, : table.shape[1]] = table
    return grown
