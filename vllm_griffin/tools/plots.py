"""Figures for the quality evidence: ROUGE vs density, flocking heatmaps, expert overlap.

matplotlib is imported inside each function (Agg backend), so importing this
module stays cheap.
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """Every figure here is written the same way: tight layout, 110 dpi, closed."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return Path(path)


def lines_vs_density(ax, entries: list[dict], metric: str, dense_value: float | None = None) -> None:
    """One quality-vs-density panel: a line per method (and request options), dense appended at
    density 1.0 and drawn as a dashed line. ``dense_value`` overrides dense's own ``metric``
    (e.g. a score against dense, which is 100 for dense by definition)."""
    from vllm_griffin.tools.eval_common import EVAL_METHODS, FULL, method_label, method_order

    dense = next((e for e in entries if e["method"] == FULL), None)
    if dense_value is None and dense is not None:
        dense_value = dense[metric]
    for label in method_order(method_label(e) for e in entries if e["method"] != FULL):
        points = sorted((e["density"], e[metric]) for e in entries
                        if method_label(e) == label and e[metric] is not None)
        if dense_value is not None:
            points.append((1.0, dense_value))
        # One colour per method in every panel and figure.
        method = label.split(" ")[0]
        color = f"C{EVAL_METHODS.index(method) % 10}" if method in EVAL_METHODS else None
        ax.plot([d for d, _ in points], [v for _, v in points], marker="o", label=label, color=color)
    if dense_value is not None:
        ax.axhline(dense_value, color="black", linestyle="--", linewidth=1, label="full (dense)")
    ax.set_xlabel("density (fraction of FF neurons kept)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_rouge_vs_density(result: dict, path: Path, metric: str = "rougeL") -> Path:
    """One panel per setting: ``metric`` vs density, a line per method, dense as a dashed line."""
    plt = _pyplot()
    summary = result["summary"]
    settings = sorted({e["setting"] for e in summary})
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        entries = [e for e in summary if e["setting"] == setting]
        lines_vs_density(ax, entries, metric)
        rows = entries[0]["rows"] if entries else 0
        ax.set_title(f"{result['model']} - {setting} ({rows} rows, {result['max_tokens']} tokens)", fontsize=9)
        ax.set_ylabel({"rougeL": "ROUGE-L", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2"}[metric])
    return _save(fig, path)


def plot_pass_at_1(result: dict, path: Path) -> Path:
    """``eval humaneval``: pass@1 (%) vs density, a line per method, dense as a dashed line."""
    plt = _pyplot()
    summary = [{**e, "pass_at_1_pct": 100 * e["pass_at_1"]} for e in result["summary"]]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    lines_vs_density(ax, summary, "pass_at_1_pct")
    n = max((e["n"] for e in summary), default=0)
    ax.set_title(f"{result['model']} - HumanEval {result['problems'][0]}-{result['problems'][1]} "
                 f"({n} problems, {result['max_tokens']} tokens)", fontsize=8)
    ax.set_ylabel("pass@1 (%)")
    return _save(fig, path)


def plot_chat(result: dict, path: Path) -> Path:
    """``eval chat``: degenerate-answer rate (%) and ROUGE-L to the dense answer vs density, per method."""
    plt = _pyplot()
    summary = [{**e, "degenerate_pct": 100 * e["degenerate_rate"]} for e in result["summary"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lines_vs_density(left, summary, "degenerate_pct")
    left.set_ylabel("degenerate answers (%)")
    lines_vs_density(right, summary, "rougeL_vs_full", dense_value=100.0)
    right.set_ylabel("ROUGE-L to the dense answer")
    n = max((e["n"] for e in summary), default=0)
    for ax in (left, right):
        ax.set_title(f"{result['model']} - chat prompts {result['prompts'][0]}-{result['prompts'][1]} "
                     f"({n}, {result['max_tokens']} tokens)", fontsize=8)
    return _save(fig, path)


def plot_drift(result: dict, path: Path) -> Path:
    """KL(dense || GRIFFIN) along the dense continuation, per 32-token window, one line per (method, density)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    window = result["window"]
    for e in result["summary"]:
        if e["prompt_len"] != "all":
            continue
        xs = [window * (i + 0.5) for i in range(len(e["kl_by_window"]))]
        ax.plot(xs, e["kl_by_window"], marker="o", label=f"{e['method']} d={e['density']:g}")
    ax.set_xlabel("generated position (dense greedy continuation)")
    ax.set_ylabel("mean KL(dense || GRIFFIN), nats")
    ax.set_title(f"{result['model']}: prompts of {'/'.join(map(str, result['prompt_lengths']))} tokens, "
                 f"{result['max_tokens']} generated", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


# -- flocking -------------------------------------------------------------------------


def flocking_data(model_name: str, text: str, layer: int, max_tokens: int = 256) -> dict:
    """Row-normalised |z| (tokens x neurons) of one layer for one prompt, neurons ordered by the statistic."""
    import torch

    from vllm_griffin.core import algorithm
    from vllm_griffin.tools import hf_griffin
    from vllm_griffin.tools.eval_common import EvalError, resolve_model

    model, tokenizer = hf_griffin.load_hf_model(resolve_model(model_name))
    num_layers = len(hf_griffin.mlps(model))
    if not 0 <= layer < num_layers:
        raise EvalError(f"--layer {layer} is invalid; allowed: 0..{num_layers - 1} for {model_name}")
    ids = tokenizer(text).input_ids[-max_tokens:]
    _, acts = hf_griffin.prefill(model, ids)
    z = acts[layer]
    stat = algorithm.prompt_contributions(z).sum(0).sqrt()
    order = torch.argsort(stat, descending=True)
    normalised = (z.abs() / z.norm(dim=-1, keepdim=True).clamp_min(1e-30))[:, order]
    mass = stat[order].square().cumsum(0) / stat.square().sum()
    width = z.shape[1]
    return {"model": model_name, "layer": layer, "tokens": len(ids), "width": width,
            "heatmap": normalised, "statistic_sorted": stat[order],
            "mass_at_density": {d: mass[max(0, int(d * width) - 1)].item() for d in (0.1, 0.25, 0.5, 0.75)}}


def plot_flocking(data: dict, path: Path, neurons: int = 512) -> Path:
    """Left: |z_t| / ||z_t|| for every prompt token (rows) over the ``neurons`` highest-statistic
    neurons (columns, in statistic order) and the same number of the lowest; right: share of the
    statistic's mass held by the top fraction of neurons."""
    import torch

    plt = _pyplot()
    heat, width = data["heatmap"], data["width"]
    n = min(neurons, width // 2)
    shown = torch.cat([heat[:, :n], heat[:, -n:]], dim=1)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    im = ax.imshow(shown.numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                   vmax=float(shown.quantile(0.995)))
    ax.axvline(n - 0.5, color="white", linewidth=1)
    ax.set_xticks([0, n // 2, n - 1, n + n // 2, 2 * n - 1], ["1", f"{n // 2}", f"{n} | {width - n + 1}",
                                                           f"{width - n + n // 2}", f"{width}"])
    ax.set_xlabel(f"neurons ranked by the GRIFFIN statistic (top {n} | bottom {n} of {width})")
    ax.set_ylabel("prompt token")
    ax.set_title(f"{data['model']} layer {data['layer']}: row-normalised |activations| ({data['tokens']} tokens)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    stat = data["statistic_sorted"]
    mass = (stat.square().cumsum(0) / stat.square().sum()).numpy()
    xs = [(i + 1) / width for i in range(width)]
    ax2.plot(xs, mass)
    ax2.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    ax2.set_xlabel("fraction of neurons kept (top by statistic)")
    ax2.set_ylabel("share of prompt activation mass")
    ax2.grid(alpha=0.3)
    return _save(fig, path)


# -- expert overlap -------------------------------------------------------------------


def overlap_from_exports(directory: Path) -> dict:
    """Pairwise Jaccard |A & B| / |A | B| of experts across requests, per layer, per (method, density)."""
    import statistics

    import torch

    from vllm_griffin.core.export import read_experts
    from vllm_griffin.tools.eval_common import EvalError

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise EvalError(f"--experts {str(directory)!r} holds no exported experts (*.safetensors); "
                        "make some with `vllm-griffin eval xsum ... --export-experts DIR`")
    groups: dict[tuple[str, float], list[list[torch.Tensor]]] = {}
    width = 0
    for f in files:
        experts, meta = read_experts(f)
        density = float(meta["density"])
        if density >= 1.0:
            continue  # dense requests keep every neuron
        groups.setdefault((meta["method"], density), []).append(experts)
        width = max(width, max(int(e.max()) + 1 for e in experts if e.numel()))
    result = {"experts_dir": str(directory), "groups": []}
    for (method, density), requests in sorted(groups.items()):
        if len(requests) < 2:
            continue
        num_layers = len(requests[0])
        per_layer = []
        for layer in range(num_layers):
            masks = torch.zeros(len(requests), width)
            for i, r in enumerate(requests):
                masks[i, r[layer].long()] = 1
            inter = masks @ masks.t()
            sizes = masks.sum(1)
            union = sizes[:, None] + sizes[None, :] - inter
            iu = torch.triu_indices(len(requests), len(requests), offset=1)
            jac = (inter / union.clamp_min(1))[iu[0], iu[1]].tolist()
            k = sizes.mean().item()
            per_layer.append({"layer": layer, "mean": statistics.fmean(jac), "median": statistics.median(jac),
                              "p10": _quantile(jac, 0.1), "p90": _quantile(jac, 0.9),
                              # two independent uniform k-subsets of D: E|A&B| = k^2/D
                              "random_expected": (k * k / width) / (2 * k - k * k / width) if k else 0.0,
                              "union_fraction": (masks.sum(0) > 0).float().mean().item()})
        result["groups"].append({"method": method, "density": density, "requests": len(requests),
                                 "width": width, "mean": statistics.fmean(p["mean"] for p in per_layer),
                                 "layers": per_layer})
    return result


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def plot_overlap(result: dict, path: Path, methods: list[str] | None = None) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for g in result["groups"]:
        if methods and g["method"] not in methods:
            continue
        layers = [p["layer"] for p in g["layers"]]
        line, = ax.plot(layers, [p["mean"] for p in g["layers"]], marker="o",
                        label=f"{g['method']} d={g['density']:g} ({g['requests']} requests)")
        ax.fill_between(layers, [p["p10"] for p in g["layers"]], [p["p90"] for p in g["layers"]],
                        color=line.get_color(), alpha=0.15)
        ax.plot(layers, [p["random_expected"] for p in g["layers"]], linestyle=":", color=line.get_color())
    ax.set_xlabel("layer")
    ax.set_ylabel("Jaccard overlap of two requests' experts")
    ax.set_title("expert overlap across requests (mean, 10-90 % band; dotted: random sets)", fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


# -- command line ---------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="figures: flocking heatmap, expert overlap across requests")
    kinds = p.add_subparsers(dest="kind", required=True)
    f = kinds.add_parser("flocking", help="row-normalised activations of one layer for one prompt (HF model)")
    f.add_argument("--model", required=True, help="embedded model name or HF folder")
    f.add_argument("--layer", type=int, default=None, help="decoder layer (default: the middle one)")
    src = f.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text")
    src.add_argument("--row", type=int, default=0, help="XSum row whose 1-shot prompt to use (default 0)")
    f.add_argument("--data", default=None, help="XSum JSONL (for --row)")
    f.add_argument("--max-prompt-tokens", type=int, default=256, help="keep the last N prompt tokens")
    f.add_argument("--neurons", type=int, default=512, help="top and bottom neurons shown")
    f.add_argument("--out", default="flocking.png")
    f.set_defaults(func=_cli_flocking)
    o = kinds.add_parser("overlap", help="Jaccard overlap of exported experts across requests")
    o.add_argument("--experts", required=True, help="folder written with VLLM_GRIFFIN_EXPORT_DIR / --export-experts")
    o.add_argument("--out", default="overlap.json", help="JSON path; the PNG goes beside it")
    o.add_argument("--plot-methods", default=None, help="comma list of methods to draw (default: all; JSON has all)")
    o.set_defaults(func=_cli_overlap)


def _cli_flocking(args) -> int:
    import json
    import sys

    from vllm_griffin.tools.eval_common import EvalError, load_rows, resolve_data

    try:
        text = args.prompt
        if text is None:
            rows = load_rows(resolve_data(args.data), 1, args.row)
            text = rows[0]["article"]
        layer = args.layer
        if layer is None:
            from vllm_griffin.tools.eval_common import resolve_model

            config = json.loads((resolve_model(args.model) / "config.json").read_text())
            layer = config["num_hidden_layers"] // 2
        data = flocking_data(args.model, text, layer, args.max_prompt_tokens)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_flocking(data, out, args.neurons)
    summary = {k: v for k, v in data.items() if k not in ("heatmap", "statistic_sorted")}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    print(f"wrote {out}, {out.with_suffix('.json')}")
    return 0


def _cli_overlap(args) -> int:
    import json
    import sys

    from vllm_griffin.tools.eval_common import EvalError

    try:
        result = overlap_from_exports(Path(args.experts))
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot_overlap(result, out.with_suffix(".png"), args.plot_methods.split(",") if args.plot_methods else None)
    for g in result["groups"]:
        means = [p["mean"] for p in g["layers"]]
        union = sum(p["union_fraction"] for p in g["layers"]) / len(g["layers"])
        print(f"{g['method']} d={g['density']:g}: {g['requests']} requests, mean Jaccard {g['mean']:.3f} "
              f"(layers {min(means):.2f}-{max(means):.2f}; random sets {g['layers'][0]['random_expected']:.2f}); "
              f"union of all {g['requests']}: {union:.2f} of the neurons")
    print(f"wrote {out}, {out.with_suffix('.png')}")
    return 0
