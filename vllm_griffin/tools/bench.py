"""``vllm-griffin bench``: decode throughput of dense vs GRIFFIN, side by side, in vLLM.

For each model one engine is started with GRIFFIN on; dense is the same engine
at per-request density 1.0 (exactly vLLM's own MLP), so both sides share every
engine setting. A model's half-FF twin (same shape, intermediate size halved)
runs dense in an engine with the same settings: its speed over the full model
is the ceiling for density 0.5.

The engine is stepped by hand: a batch counts as prefilled once every request
has its first token; decode tokens/s is B over the median time of the decode
steps after that in which every request got a token, pooled over the rounds
(robust to another process briefly taking the core; the whole-run figure is kept
in the JSON as ``decode_tok_s_whole_runs``). A round runs every density once, back
to back; there are at least ``--repeats`` rounds and more until each density has
``--decode-seconds`` of decode steps. GRIFFIN/dense is the median over rounds of
the ratio within a round (a shared machine's speed drifts between rounds; the two
runs of a round see nearly the same machine). Per batch size B and density d it
reports that, the ratio to the ceiling, the prefill overhead of statistic capture
(time to the batch's first tokens at d vs 1.0, paired the same way: the decode
runs' prefills plus prefill-only rounds until each density has enough), the mean
union fraction of the batch's experts (from their exported expert sets), and
which decode paths ran.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

MODELS = {
    # name: (source, intermediate size override)
    "smollm2": ("smollm2-135m-instruct", None),
    "gemma": ("gemma-3-270m", None),
    "qwen-coder": ("qwen2.5-coder-0.5b-instruct", None),
    "llama-1b": ("llama-1b", 8192),
    "llama-1b-half": ("llama-1b", 4096),
}
TWINS = {"llama-1b": "llama-1b-half"}
# --prompts: where a batch's prompts come from (real ones at their own lengths).
PROMPT_SOURCES = ("random", "xsum", "humaneval")
MAX_PREFILL_ROUNDS = 32
MAX_DECODE_ROUNDS = 12
DENSE = ("full", 1.0)  # a cell: (method label, density); density 1.0 is vLLM's own MLP


def parse_method(label: str) -> tuple[str, dict]:
    """``--methods`` entries: a method name, optionally followed by ``+refreshN`` and ``+guardN``
    (e.g. ``topk+refresh4``, ``gated+refresh4+guard8``): (method, extra request options)."""
    from vllm_griffin.core.algorithm import METHODS
    from vllm_griffin.core.config import GriffinConfigError, check_loop_guard, check_refresh

    method, *extras = label.split("+")
    if method not in METHODS:
        raise ValueError(f"--methods: {label!r} is invalid; allowed: {', '.join(METHODS)}, each optionally "
                         "+refreshN and +guardN (e.g. topk+refresh4, gated+refresh4+guard8)")
    options = {}
    for extra in extras:
        for prefix, key, check in (("refresh", "refresh", check_refresh), ("guard", "loop_guard", check_loop_guard)):
            number = extra[len(prefix):]
            if extra.startswith(prefix) and number.isdigit() and key not in options:
                try:
                    options[key] = check(int(number), key, "--methods")
                except GriffinConfigError as exc:
                    raise ValueError(str(exc)) from None
                break
        else:
            raise ValueError(f"--methods: {label!r} is invalid; allowed after '+': refreshN and guardN, "
                             "each at most once, N an integer")
    return method, options


def random_llama_dir(intermediate: int) -> Path:
    """Config-only folder of the 1B Llama shape; vLLM fills it with random weights."""
    import transformers

    from vllm_griffin.tools.models import griffin_home

    path = griffin_home() / "bench" / f"llama-1b-ff{intermediate}"
    if not (path / "config.json").exists():
        cfg = transformers.LlamaConfig(
            hidden_size=2048, intermediate_size=intermediate, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=4096)
        cfg.architectures = ["LlamaForCausalLM"]
        path.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(path)
    return path


def model_source(name: str) -> tuple[Path, dict]:
    source, intermediate = MODELS[name]
    if source == "llama-1b":
        return random_llama_dir(intermediate), {"load_format": "dummy"}
    from vllm_griffin.tools.models import prepare_model

    return prepare_model(source), {}


def real_prompts(model_dir: Path, source: str, count: int, data: str | None) -> list[list[int]]:
    """Token ids of the first ``count`` XSum 1-shot prompts or HumanEval problems (as the
    evals send them: the raw prompt text), tokenized for the model."""
    from transformers import AutoTokenizer

    if source == "xsum":
        from vllm_griffin.tools.eval_common import load_rows, resolve_data

        texts = [row["article"] for row in load_rows(resolve_data(data), limit=count)]
    else:
        from vllm_griffin.tools.eval_humaneval import load_problems

        texts = [p["prompt"] for p in load_problems(limit=count)]
    if len(texts) < count:
        raise SystemExit(f"--prompts {source}: {len(texts)} prompts, the largest batch needs {count}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(text)["input_ids"] for text in texts]


def union_fraction(export_dir: Path, request_ids: list[str], width: int) -> float:
    """Mean over layers of |union of the batch's experts| / D."""
    import torch

    from vllm_griffin.core.export import read_experts

    per_request = [read_experts(export_dir / f"{rid}.safetensors")[0] for rid in request_ids]
    fractions = []
    for layer in range(len(per_request[0])):
        used = torch.zeros(width, dtype=torch.bool)
        for experts in per_request:
            used[experts[layer].long()] = True
        fractions.append(used.float().mean().item())
    return sum(fractions) / len(fractions)


class Runner:
    def __init__(self, name: str, args, export_dir: Path):
        from vllm import LLM

        path, extra = model_source(name)
        self.name = name
        config = json.loads((path / "config.json").read_text())
        config = config.get("text_config", config)  # multimodal-style configs (Gemma 3)
        self.width = MODELS[name][1] or config["intermediate_size"]
        self.export_dir = export_dir
        max_b = max(args.batch_sizes)
        self.real_prompts = None if args.prompts == "random" else real_prompts(path, args.prompts, max_b, args.data)
        longest = max(map(len, self.real_prompts)) if self.real_prompts else args.prompt_len
        self.llm = LLM(model=str(path), skip_tokenizer_init=True, dtype=args.dtype, enforce_eager=not args.compile,
                       gpu_memory_utilization=0.5, max_model_len=longest + args.gen_len + 8,
                       max_num_seqs=max_b, max_num_batched_tokens=max(2048, longest),
                       additional_config={"griffin": {"density": 0.5}}, seed=0,
                       # Repeated prompts would hit the cache and skew the prefill figures.
                       enable_prefix_caching=False, **extra)
        self.args = args
        self.run_id = 0

    def prompts(self, batch: int):
        import torch
        from vllm.inputs import TokensPrompt

        if self.real_prompts is not None:  # the first `batch` rows, at their own lengths
            return [TokensPrompt(prompt_token_ids=ids) for ids in self.real_prompts[:batch]]
        gen = torch.Generator().manual_seed(batch)
        return [TokensPrompt(prompt_token_ids=torch.randint(100, 40000, (self.args.prompt_len,),
                                                            generator=gen).tolist())
                for _ in range(batch)]

    def params(self, cell: tuple[str, float], max_tokens: int):
        from vllm import SamplingParams

        label, density = cell
        method, options = ("topk", {}) if label == DENSE[0] else parse_method(label)
        return SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                              detokenize=False,
                              extra_args={"griffin": {"density": density, "method": method, "refresh": 0,
                                                      "loop_guard": 0, **options}})

    def timed_steps(self, batch: int, density: tuple[str, float]) -> tuple[float, float, int, list[float]]:
        """(seconds until every request has its first token, seconds after that,
        tokens generated after that, the seconds of each decode step in which every
        request got a token) for one batch, stepping the engine by hand."""
        engine = self.llm.llm_engine
        params = self.params(density, self.args.gen_len)
        self.run_id += 1
        for i, prompt in enumerate(self.prompts(batch)):
            engine.add_request(f"bench-{self.run_id}-{i}", prompt, params)
        lengths: dict[str, int] = {}
        start = time.perf_counter()
        while len(lengths) < batch:  # prefill: until every request has a first token
            for out in engine.step():
                lengths[out.request_id] = len(out.outputs[0].token_ids)
        prefilled = time.perf_counter()
        at_prefilled = sum(lengths.values())
        full_steps = []
        while engine.has_unfinished_requests():
            before, step_start = sum(lengths.values()), time.perf_counter()
            for out in engine.step():
                lengths[out.request_id] = len(out.outputs[0].token_ids)
            if sum(lengths.values()) - before == batch:
                full_steps.append(time.perf_counter() - step_start)
        return prefilled - start, time.perf_counter() - prefilled, sum(lengths.values()) - at_prefilled, full_steps

    def timed_prefill(self, batch: int, density: tuple[str, float]) -> float:
        """Seconds to run the batch's prompts and sample one token each (capture and
        selection included)."""
        engine = self.llm.llm_engine
        params = self.params(density, 1)
        self.run_id += 1
        for i, prompt in enumerate(self.prompts(batch)):
            engine.add_request(f"bench-{self.run_id}-{i}", prompt, params)
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return time.perf_counter() - start

    def warm_up(self, batch: int, densities: list[tuple[str, float]]) -> None:
        """One untimed prefill and decode per density: first calls (allocations, the
        kernels' first use, each top-k size) are not measured."""
        for density in densities:
            self.timed_prefill(batch, density)
            self.timed_steps(batch, density)

    def stats(self) -> dict:
        return self.llm.collective_rpc("griffin_stats")[0]

    def measure(self, batch: int, densities: list[tuple[str, float]]) -> list[dict]:
        """Every cell (method, density) for one batch size, alternating over the repeats; medians.
        (The variables say "density" for a cell: most runs vary only that.)"""
        samples: dict[tuple, list[tuple[float, float, int]]] = {d: [] for d in densities}
        prefills: dict[tuple, list[float]] = {d: [] for d in densities}
        # The worker's own timers around GRIFFIN's prefill work (capture + selection) per
        # prefill: a figure this machine's slow spells barely move, beside the end-to-end one.
        griffin_work: dict[tuple, list[float]] = {d: [] for d in densities}
        paths: dict[tuple, dict[str, int]] = {d: {} for d in densities}

        def work(before: dict, after: dict) -> float:
            return sum(after[k] - before[k] for k in ("capture_seconds", "select_seconds"))

        # Rounds: every density once, in reverse every other round (no density always
        # runs first). At least --repeats; more, up to MAX_DECODE_ROUNDS, until each density
        # has --decode-seconds of full decode steps: slow spells of a shared machine last
        # seconds to minutes, and many short rounds let each spell hit every density alike.
        rep = 0
        while rep < self.args.repeats or (rep < MAX_DECODE_ROUNDS and min(
                sum(t for *_, full in runs for t in full) for runs in samples.values()) < self.args.decode_seconds):
            for density in densities[:: -1 if rep % 2 else 1]:
                before = self.stats()
                samples[density].append(self.timed_steps(batch, density))
                prefills[density].append(samples[density][-1][0])  # a decode run starts with a prefill
                after = self.stats()
                griffin_work[density].append(work(before, after))
                was, now = before["decode_paths"], after["decode_paths"]
                for k in now:
                    if now[k] != was.get(k, 0):
                        paths[density][k] = paths[density].get(k, 0) + now[k] - was.get(k, 0)
            rep += 1
        # Prefill is short and noisy: more samples from prefill-only rounds, until each
        # density has --prefill-repeats and has run --prefill-seconds in all.
        rep = 0
        while min(map(len, prefills.values())) < self.args.prefill_repeats or (
                rep < MAX_PREFILL_ROUNDS and min(map(sum, prefills.values())) < self.args.prefill_seconds):
            for density in densities[:: -1 if rep % 2 else 1]:
                before = self.stats()
                prefills[density].append(self.timed_prefill(batch, density))
                griffin_work[density].append(work(before, self.stats()))
            rep += 1
        entries = []
        for density in densities:
            prefill = statistics.median(prefills[density])
            # Throughput from the median decode step over every repeat: a step that another
            # process on this machine slowed down moves a mean, not the median.
            steps = [t for *_, full in samples[density] for t in full]
            whole_runs = statistics.median(n / d for _, d, n, _ in samples[density])
            decode_tok_s = batch / statistics.median(steps) if steps else whole_runs
            entry = {"model": self.name, "batch": batch, "method": density[0], "density": density[1],
                     "prompts": self.args.prompts,
                     "prompt_tokens": statistics.mean(len(p["prompt_token_ids"]) for p in self.prompts(batch)),
                     "prefill_s": prefill,
                     "decode_tok_s": decode_tok_s, "decode_tok_s_whole_runs": whole_runs,
                     "decode_paths": paths[density], "samples": [s[:3] for s in samples[density]],
                     "step_seconds": steps, "prefill_samples": prefills[density],
                     "prefill_griffin_s": statistics.median(griffin_work[density]),
                     "prefill_griffin_samples": griffin_work[density],
                     # Per round (aligned across densities): the run's median full decode step.
                     "round_step_medians": [statistics.median(full) if full else None
                                            for *_, full in samples[density]]}
            if density[1] < 1.0:  # untimed: the same prompts once more, writing their experts
                self.llm.collective_rpc("griffin_export_to", args=(str(self.export_dir),))
                outs = self.llm.generate(self.prompts(batch), self.params(density, 1), use_tqdm=False)
                self.llm.collective_rpc("griffin_export_to", args=(None,))
                entry["union_fraction"] = union_fraction(self.export_dir, [o.request_id for o in outs], self.width)
            entries.append(entry)
        return entries

    def close(self):
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm


def run(args) -> dict:
    from tqdm import tqdm

    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("func",)}, "runs": []}
    models = list(args.models)
    for name in list(models):
        if name in TWINS and TWINS[name] not in models and 0.5 in args.densities:
            models.append(TWINS[name])
    cells = [DENSE] + [(label, d) for label in args.methods for d in args.densities if d < 1.0]
    plan = [(m, b, [DENSE] if m in TWINS.values() else cells) for m in models for b in args.batch_sizes]
    bar = tqdm(total=len(plan), desc="bench", unit="batch size")
    for name in models:
        with tempfile.TemporaryDirectory() as export_dir:
            runner = Runner(name, args, Path(export_dir))
            runner.warm_up(min(args.batch_sizes), [DENSE] if name in TWINS.values() else cells)
            for model, batch, densities in plan:
                if model != name:
                    continue
                bar.set_postfix(model=name, batch=batch)
                results["runs"].extend(runner.measure(batch, densities))
                bar.update()
            runner.close()
    bar.close()
    results["summary"] = summarize(results["runs"])
    return results


def paired_ratio(numerators, denominators, fallback: float) -> float:
    """Median of numerators[i] / denominators[i] over the rounds both measured (the two
    sides of a ratio ran seconds apart in each round); ``fallback`` without any."""
    pairs = [a / b for a, b in zip(numerators or [], denominators or []) if a and b]
    return statistics.median(pairs) if pairs else fallback


def summarize(runs: list[dict]) -> list[dict]:
    # Runs from before methods were a bench axis carry no "method": they were topk.
    by_key = {(r["model"], r["batch"], r.get("method", "topk") if r["density"] < 1.0 else DENSE[0], r["density"]): r
              for r in runs}
    rows = []
    for (model, batch, method, density), r in sorted(by_key.items()):
        if density == 1.0 or model in TWINS.values():
            continue
        dense = by_key[(model, batch, *DENSE)]
        row = {"model": model, "batch": batch, "method": method, "density": density,
               "dense_tok_s": dense["decode_tok_s"], "griffin_tok_s": r["decode_tok_s"],
               # Ratios paired by round (runs minutes apart see different machine speeds).
               "vs_dense": paired_ratio(dense.get("round_step_medians"), r.get("round_step_medians"),
                                        r["decode_tok_s"] / dense["decode_tok_s"]),
               "prefill_overhead": paired_ratio(r["prefill_samples"], dense["prefill_samples"],
                                                r["prefill_s"] / dense["prefill_s"]) - 1.0,
               # GRIFFIN's prefill work as the worker timed it, over dense's prefill.
               "prefill_griffin_share": r.get("prefill_griffin_s", 0.0) / dense["prefill_s"],
               "union_fraction": r.get("union_fraction"), "decode_paths": r["decode_paths"],
               "prompts": r.get("prompts", "random"), "prompt_tokens": r.get("prompt_tokens")}
        twin = by_key.get((TWINS.get(model), batch, *DENSE))
        if twin is not None and density == 0.5:
            row["ceiling_vs_dense"] = twin["decode_tok_s"] / dense["decode_tok_s"]
            row["vs_ceiling"] = row["vs_dense"] / row["ceiling_vs_dense"]
        rows.append(row)
    return rows


def markdown(summary: list[dict]) -> str:
    lines = ["| model | prompts | batch | method | density | dense tok/s | GRIFFIN tok/s | GRIFFIN/dense | "
             "ceiling/dense | "
             "of ceiling | prefill overhead | capture + selection | union fraction |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
        prompts = r.get("prompts", "random")
        if r.get("prompt_tokens"):
            prompts += f" ({r['prompt_tokens']:.0f} tok)"
        lines.append(f"| {r['model']} | {prompts} | {r['batch']} | {r.get('method', 'topk')} | {r['density']} | "
                     f"{r['dense_tok_s']:.2f} | "
                     f"{r['griffin_tok_s']:.2f} | {r['vs_dense']:.2f} | {fmt(r.get('ceiling_vs_dense'), '.2f')} | "
                     f"{fmt(r.get('vs_ceiling'), '.2f')} | {r['prefill_overhead'] * 100:+.1f} % | "
                     f"{r['prefill_griffin_share'] * 100:.1f} % | "
                     f"{fmt(r.get('union_fraction'), '.2f')} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = sorted({r["model"] for r in summary})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        cells = sorted({(r.get("method", "topk"), r["density"]) for r in summary if r["model"] == model})
        for method, density in cells:
            pts = sorted((r["batch"], r["vs_dense"]) for r in summary if r["model"] == model
                         and r["density"] == density and r.get("method", "topk") == method)
            label = f"density {density}" if len({m for m, _ in cells}) == 1 else f"{method} {density}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ceil = sorted((r["batch"], r["ceiling_vs_dense"]) for r in summary
                      if r["model"] == model and "ceiling_vs_dense" in r)
        if ceil:
            ax.plot([p[0] for p in ceil], [p[1] for p in ceil], "k--", label="half-FF ceiling (d=0.5)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode speed-up over dense")
        ax.set_title(model)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="decode throughput: dense vs GRIFFIN vs the half-FF ceiling")
    p.add_argument("--models", type=lambda s: s.split(","), default=["smollm2", "llama-1b"],
                   help=f"comma-separated, from {', '.join(MODELS)} (a model's half-FF twin is added for d=0.5)")
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--densities", type=lambda s: [float(v) for v in s.split(",")], default=[0.25, 0.5, 0.75])
    p.add_argument("--methods", type=lambda s: s.split(","), default=["topk"],
                   help="comma-separated selection methods, each at every density, optionally +refreshN "
                        "(e.g. topk,gated,topk+refresh4); dense always runs beside them")
    p.add_argument("--prompts", choices=PROMPT_SOURCES, default="random",
                   help="random token prompts of --prompt-len, or real ones at their own lengths: XSum 1-shot "
                        "(../shared/data, or --data) or HumanEval problems, the first of each per batch")
    p.add_argument("--data", default=None, help="XSum JSONL for --prompts xsum (default: ../shared/data)")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompts' length")
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=2,
                   help="decode rounds per batch size, at least (each runs every density once)")
    p.add_argument("--decode-seconds", type=float, default=10.0,
                   help=f"more rounds (up to {MAX_DECODE_ROUNDS}) until each density has this much decode time")
    p.add_argument("--prefill-repeats", type=int, default=4,
                   help="prefill samples per batch size and density (prefill overhead; the decode runs' "
                        "prefills count, prefill-only runs add the rest); medians reported")
    p.add_argument("--prefill-seconds", type=float, default=2.0,
                   help=f"more prefill-only rounds (up to {MAX_PREFILL_ROUNDS}) until each density's prefill "
                        "samples add up to this: short prefills are noisy")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default: eager)")
    p.add_argument("--out", type=Path, default=Path("results/bench.json"))
    p.set_defaults(func=main)


def main(args) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model {unknown[0]!r}; allowed: {', '.join(MODELS)}")
    for label in args.methods:
        try:
            parse_method(label)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    table = markdown(results["summary"])
    args.out.with_suffix(".md").write_text(table + "\n")
    png = args.out.with_suffix(".png")
    print(table)
    print(f"\nwrote {args.out}, {args.out.with_suffix('.md')}" + (f", {png}" if plot(results["summary"], png) else
                                                                   " (install matplotlib for the plot)"))
    return 0
