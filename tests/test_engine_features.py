"""GRIFFIN under vLLM's engine features, on real engines with the tiny random Llama
(float32, CPU): preemption with recompute, speculative decoding (ngram), tensor
parallelism, prefix caching.

Reference for all of them: each request run alone on a GRIFFIN engine without
prefix caching ("reference"), its greedy tokens and its exported experts; the
experts are also held to the from-the-paper oracle. Every reference run happens
in one engine start, then each feature gets its own engine.
"""

from __future__ import annotations

import pytest

from tests.conftest import hf_model
from tests.oracle import griffin_generate
from tests.test_engine_tiny import make_prompts, params, tokens_prompt
from vllm_griffin.core.export import read_experts

pytestmark = pytest.mark.slow

DENSITY = 0.5
MAX_TOKENS = 40
# Four prompts of 40-70 tokens, each growing to 80-110 tokens: alone each fits the
# preemption engine's KV cache, together they cannot.
PREEMPT_LENGTHS = [40, 55, 70, 48]


def engine_kwargs(model_dir, **extra):
    base = dict(model=str(model_dir), skip_tokenizer_init=True, max_model_len=256,
                max_num_batched_tokens=32, max_num_seqs=8,
                additional_config={"griffin": {"density": DENSITY, "method": "topk"}})
    return {**base, **extra}


# A request that refreshes its experts every 4 generated tokens (per-request option).
REFRESH = {"griffin": {"refresh": 4}}


def run(llm, prompts, max_tokens=MAX_TOKENS, extra_args=None):
    """Greedy token ids per prompt, and the request ids vLLM reported."""
    sampling = params(max_tokens)
    sampling.extra_args = extra_args
    outs = llm.generate([tokens_prompt(p) for p in prompts], [sampling] * len(prompts), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.request_id for o in outs]


def experts(export_dir, request_id):
    layers, meta = read_experts(export_dir / f"{request_id}.safetensors")
    return [e.tolist() for e in layers]


def worker_stats(llm):
    stats = llm.collective_rpc("griffin_stats")
    assert [s["inconsistencies"] for s in stats] == [""] * len(stats)  # every look checks the bookkeeping
    return stats


def metric(llm, name):
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name)


@pytest.fixture(scope="module")
def export_root(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-experts")


_reference: dict[str, tuple[list[int], list[list[int]]]] = {}


def reference(engines, model_dir, export_root, prompts, extra_args=None):
    """(tokens, experts) of each prompt run alone on a GRIFFIN engine with a roomy KV
    cache and no prefix caching. The first call runs every prompt of this module."""
    if not _reference:
        folder = export_root / "reference"
        llm = engines.get("features-reference", env={"VLLM_GRIFFIN_EXPORT_DIR": str(folder)},
                          **engine_kwargs(model_dir, enable_prefix_caching=False))
        cache = llm.llm_engine.vllm_config.cache_config
        _reference["kv tokens"] = (cache.num_gpu_blocks * cache.block_size, cache.block_size)

        def alone(prompt, extra_args=None):
            (tokens,), (rid,) = run(llm, [prompt], extra_args=extra_args)
            _reference[str(prompt) + str(extra_args or "")] = (tokens, experts(folder, rid))

        for prompt in (make_prompts(PREEMPT_LENGTHS, seed=11) + repetitive_prompts() + tp_prompts()
                       + prefix_prompts()):
            alone(prompt)
        for prompt in make_prompts(PREEMPT_LENGTHS, seed=11):
            alone(prompt, REFRESH)
        # A prompt that continues another request's output (see the prefix test).
        alone(continued_prompt(prefix_prompts()[0]))
    return [_reference[str(p) + str(extra_args or "")] for p in prompts]


# --- preemption -----------------------------------------------------------------------------

def test_preempted_requests_keep_their_experts_and_tokens(engines, tiny_llama_dir, export_root):
    prompts = make_prompts(PREEMPT_LENGTHS, seed=11)
    want = reference(engines, tiny_llama_dir, export_root, prompts)
    model = hf_model(tiny_llama_dir)
    for prompt, (_, want_experts) in zip(prompts, want):
        oracle = griffin_generate(model, prompt, DENSITY, max_new_tokens=1).experts
        assert want_experts == [e.tolist() for e in oracle]

    folder = export_root / "preempt"
    # 6 blocks of 32 tokens, one reserved by vLLM: 160 token slots; the four requests need ~400 together.
    llm = engines.get("features-preempt", env={"VLLM_GRIFFIN_EXPORT_DIR": str(folder)},
                      **engine_kwargs(tiny_llama_dir, block_size=32, num_gpu_blocks_override=6,
                                      max_model_len=160, disable_log_stats=False))
    tokens, rids = run(llm, prompts)
    assert metric(llm, "vllm:num_preemptions") > 0, "the KV cache was meant to force preemption"
    (stats,) = worker_stats(llm)
    assert stats["restarts"] > 0 and stats["slots_in_use"] == 0 and stats["acc_in_use"] == 0
    for i, (got, rid, (want_tokens, want_experts)) in enumerate(zip(tokens, rids, want)):
        assert got == want_tokens, f"prompt {i}"
        # Exported once, when the prompt completed; a recompute never re-selects.
        assert experts(folder, rid) == want_experts, f"prompt {i}"

    # Refreshing requests: a recompute runs each output token on the experts it first ran on
    # (and each refresh token dense again), so the tokens equal each request's run alone.
    want = reference(engines, tiny_llama_dir, export_root, prompts, REFRESH)
    restarts = stats["restarts"]
    tokens, _ = run(llm, prompts, extra_args=REFRESH)
    (stats,) = worker_stats(llm)
    assert stats["restarts"] > restarts and stats["refresh_tokens"] > 0 and stats["slots_in_use"] == 0
    assert tokens == [t for t, _ in want]


# --- speculative decoding -------------------------------------------------------------------

def repetitive_prompts():
    # Repeated n-grams give the ngram proposer drafts from the first decode step.
    base = make_prompts([6, 9, 5], seed=12)
    return [p * 6 for p in base]


def test_ngram_spec_decode_equals_plain_decode(engines, tiny_llama_dir, export_root):
    prompts = repetitive_prompts()
    want = reference(engines, tiny_llama_dir, export_root, prompts)
    folder = export_root / "spec"
    llm = engines.get("features-spec", env={"VLLM_GRIFFIN_EXPORT_DIR": str(folder)},
                      **engine_kwargs(tiny_llama_dir, disable_log_stats=False, speculative_config={
                          "method": "ngram", "num_speculative_tokens": 3,
                          "prompt_lookup_min": 2, "prompt_lookup_max": 4}))
    tokens, rids = run(llm, prompts)
    assert metric(llm, "vllm:spec_decode_num_draft_tokens") > 0
    assert metric(llm, "vllm:spec_decode_num_accepted_tokens") > 0
    (stats,) = worker_stats(llm)
    assert stats["multi_token_decode_rows"] > 0
    for i, (got, rid, (want_tokens, want_experts)) in enumerate(zip(tokens, rids, want)):
        assert got == want_tokens, f"prompt {i}"
        assert experts(folder, rid) == want_experts, f"prompt {i}"


# --- tensor parallelism ---------------------------------------------------------------------

def tp_prompts():
    return make_prompts([12, 33, 50], seed=13)


def test_tensor_parallel_selects_the_single_device_experts(engines, tiny_llama_dir, export_root):
    prompts = tp_prompts()
    want = reference(engines, tiny_llama_dir, export_root, prompts)
    folder = export_root / "tp2"
    # One CPU core per rank; each rank holds half of every layer's 384 FF neurons.
    llm = engines.get("features-tp2", env={"VLLM_GRIFFIN_EXPORT_DIR": str(folder),
                                           "VLLM_CPU_OMP_THREADS_BIND": "0|1"},
                      **engine_kwargs(tiny_llama_dir, tensor_parallel_size=2))
    tokens, rids = run(llm, prompts, max_tokens=16)
    stats = worker_stats(llm)
    assert len(stats) == 2 and all(s["slots_in_use"] == 0 for s in stats)
    for i, (got, rid, (want_tokens, want_experts)) in enumerate(zip(tokens, rids, want)):
        # Exported by rank 0 as global indices: the same experts as one device picks.
        assert experts(folder, rid) == want_experts, f"prompt {i}"
        assert got == want_tokens[:16], f"prompt {i}"


# --- prefix caching -------------------------------------------------------------------------

BLOCK = 32


def prefix_prompts():
    # One 70-token prefix (two full 32-token blocks and a part), three endings.
    (shared,) = make_prompts([70], seed=14)
    return [shared + tail for tail in make_prompts([10, 25, 3], seed=15)]


def continued_prompt(prompt):
    """``prompt`` followed by 30 of the tokens GRIFFIN generates for it: its third block
    (tokens 64-95) holds prompt and generated tokens."""
    tokens, _ = _reference[str(prompt)]
    return prompt + tokens[:30]


def test_prefix_cache_hits_select_the_experts_of_a_full_prefill(engines, tiny_llama_dir, export_root):
    first, *others = prefix_prompts()
    want = reference(engines, tiny_llama_dir, export_root, [first, *others])
    folder = export_root / "prefix"
    llm = engines.get("features-prefix", env={"VLLM_GRIFFIN_EXPORT_DIR": str(folder)},
                      **engine_kwargs(tiny_llama_dir, enable_prefix_caching=True, block_size=BLOCK,
                                      disable_log_stats=False))
    cache = llm.llm_engine.vllm_config.cache_config
    assert cache.enable_prefix_caching  # GRIFFIN leaves it on
    # The per-block statistic lives in host memory: the KV cache holds as many tokens as
    # the same budget without prefix caching (within one block of rounding).
    kv_tokens, ref_block = _reference["kv tokens"]
    assert abs(cache.num_gpu_blocks * cache.block_size - kv_tokens) <= max(BLOCK, ref_block)
    (stats,) = worker_stats(llm)
    assert stats["block_stat_rows"] == cache.num_gpu_blocks

    def one(prompt):
        before = worker_stats(llm)[0]
        (tokens,), (rid,) = run(llm, [prompt])
        after = worker_stats(llm)[0]
        return tokens, experts(folder, rid), after["prefix_hit_tokens"] - before["prefix_hit_tokens"]

    tokens, got_experts, hit = one(first)
    assert hit == 0 and (tokens, got_experts) == tuple(want[0])
    for prompt, (want_tokens, want_experts) in zip(others, want[1:]):
        tokens, got_experts, hit = one(prompt)
        assert hit == 2 * BLOCK  # the two full blocks of the shared prefix
        assert got_experts == want_experts and tokens == want_tokens
    assert metric(llm, "vllm:prefix_cache_hits") >= 2 * 2 * BLOCK

    # Blocks holding generated tokens (computed on the request's experts) are never
    # shared: a prompt that continues `first`'s output hits only its prompt blocks.
    continued = continued_prompt(first)
    (want_tokens, want_experts), = reference(engines, tiny_llama_dir, export_root, [continued])
    tokens, got_experts, hit = one(continued)
    assert hit == 2 * BLOCK
    assert got_experts == want_experts and tokens == want_tokens


def test_sliding_window_model_shares_no_blocks_and_keeps_serving(engines, tmp_path_factory):
    # Gemma 3's sliding-window layers free and skip blocks per layer: a block id does
    # not name the same prompt tokens in every layer, so there is no per-block statistic
    # and GRIFFIN's scheduler registers no block for sharing.
    from tests.tiny_models import save_tiny

    model_dir = save_tiny("Gemma3ForCausalLM", tmp_path_factory.mktemp("gemma3"))
    llm = engines.get("features-gemma3-prefix", **engine_kwargs(
        model_dir, enable_prefix_caching=True, block_size=BLOCK, max_model_len=512, disable_log_stats=False))
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    first, second, _ = prefix_prompts()
    again = [run(llm, [prompt], max_tokens=8)[0][0] for prompt in (first, second, first)]
    assert again[0] == again[2]
    assert metric(llm, "vllm:prefix_cache_hits") == 0
    (stats,) = worker_stats(llm)
    assert stats["prefix_hit_tokens"] == 0 and stats["block_stat_rows"] == 0 and stats["slots_in_use"] == 0
