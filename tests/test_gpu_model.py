"""benchmarks/gpu_model.py (the whole-model GPU decode benchmark) on the CPU: its tiny shape
end to end under TRITON_INTERPRET=1 (the Triton kernels it times, against its own torch
oracle), its prefill statistic and selection against an independent computation, and
its correctness check catching a wrong kernel."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import gpu_model
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

from vllm_griffin.core import algorithm
from vllm_griffin.ops.reference import experts_mlp_gather

BATCHES = (1, 2)
ROUNDS = 2
CONFIGS = {"dense", "griffin@0.25", "griffin@0.5", "griffin@0.75", "half-ff"}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The script as a device run calls it, on the tiny shape: a subprocess, since
    TRITON_INTERPRET must be set before the kernels are defined."""
    out = tmp_path_factory.mktemp("gpu_model") / "gpu_model.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_model.py"), "--tiny", "--device", "cpu",
           "--batches", ",".join(map(str, BATCHES)), "--steps", "1", "--rounds", str(ROUNDS), "--prompt-len", "16",
           "--out", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_check_triton_decode_equals_gather_oracle_and_density1_equals_dense(cli_run):
    check = cli_run[0]["check"]
    assert check["passed"]
    cases = {"triton_vs_gather", "triton_union_vs_gather", "masked_vs_gather", "triton_density1_vs_dense",
             "triton_union_density1_vs_dense"}
    assert set(check["layer_errors"]) == set(check["logits_errors"]) == cases
    # float32 on the CPU: only summation order differs.
    assert check["layer_tolerance"] == check["logits_tolerance"] == 1e-4
    assert max(check["layer_errors"].values()) < 1e-5
    assert max(check["logits_errors"].values()) < 1e-5
    # Half the neurons moves every layer and the logits far beyond that: the check can tell.
    assert check["layer_gather_vs_dense_min"] > 0.1
    assert check["logits_gather_vs_dense"] > 0.05


def test_end_to_end_json_has_every_config_and_batch(cli_run):
    results, stdout = cli_run
    assert results["shape"] == dataclasses.asdict(gpu_model.TINY)
    assert results["graphs"] is False  # CPU: eager steps
    rows = {(r["batch"], r["config"]): r for r in results["results"]}
    assert set(rows) == {(b, c) for b in BATCHES for c in CONFIGS}
    width = gpu_model.TINY.ffn
    for (batch, config), r in rows.items():
        dense_ms = rows[batch, "dense"]["ms_per_step"]
        assert len(r["round_ms"]) == ROUNDS and r["ms_per_step"] > 0
        assert r["tok_per_s"] == pytest.approx(batch * 1e3 / r["ms_per_step"])
        assert r["speedup_vs_dense"] == pytest.approx(dense_ms / r["ms_per_step"])
        if config.startswith("griffin@"):
            density = float(config.removeprefix("griffin@"))
            k = algorithm.num_experts(density, width)
            # Batch 1 runs the per-row kernel, more rows the union kernel (the default --path union).
            assert r["path"] == ("triton" if batch == 1 else "triton_union")
            assert r["experts_fraction"] == k / width
            # The rows' union holds each row's k experts and at most all of theirs.
            assert k / width <= r["union_fraction"] <= min(1.0, batch * k / width)
            if batch == 1:
                assert r["union_fraction"] == k / width
        else:
            assert r["path"] == "dense" and r["union_fraction"] is None
    assert rows[1, "dense"]["speedup_vs_dense"] == 1.0
    assert rows[1, "half-ff"]["ffn"] == width // 2
    # Independent random prompts: two rows' experts are not the same set.
    assert rows[2, "griffin@0.5"]["union_fraction"] > 0.5
    assert "| 2 | griffin@0.5 | triton_union |" in stdout


def test_prefill_statistic_and_selection_of_one_sequence():
    """The prefill's experts for one sequence and layer equal the top-k of the paper's
    statistic computed here from the captured MLP input, and do not depend on the
    other sequences of the batch."""
    model = gpu_model.Llama(gpu_model.TINY, torch.float32, torch.device("cpu"), seed=3)
    batch, prompt_len, density, seq = 3, 12, 0.5, 1
    b = gpu_model.Batch(model, batch, prompt_len, seed=7, keep_activations=True)
    sel = gpu_model.select(b.stat_sums, density)
    width = gpu_model.TINY.ffn
    k = int(density * width)
    alone = gpu_model.select(gpu_model.Batch(model, 1, prompt_len, seed=0, prompts=b.prompts[seq:seq + 1]).stat_sums,
                             density)
    for layer, (x, z) in enumerate(b.capture.kept):
        w = model.mlps[layer]
        gate, up = F.linear(x.double(), w.gate_up.double()).split(width, dim=-1)
        want_z = F.silu(gate) * up
        assert torch.allclose(z.double(), want_z, rtol=1e-4, atol=1e-6)
        # s_j**2 = sum over this sequence's prompt tokens of z_tj**2 / ||z_t||**2.
        z_seq = want_z.view(batch, prompt_len, width)[seq]
        stat = (z_seq.square() / z_seq.square().sum(-1, keepdim=True)).sum(0)
        assert torch.allclose(b.stat_sums[layer, seq].double(), stat, rtol=1e-4)
        want = torch.topk(stat, k).indices.sort().values
        assert torch.equal(sel.experts[layer][seq].long(), want)
        assert torch.equal(sel.masks[layer][seq].nonzero().flatten(), want)
        assert torch.equal(alone.experts[layer][0], sel.experts[layer][seq])
    assert sel.counts.tolist() == [k] * batch
    # The sequences' expert sets differ (per-sequence statistics, not one for the batch).
    assert not torch.equal(sel.experts[0][0], sel.experts[0][1])


class FakeKernels:
    """Stands in for ops.triton_experts (no Triton): the torch oracle, optionally broken."""

    def __init__(self, broken_union: bool):
        self.broken_union = broken_union

    def experts_mlp_triton(self, x, w, experts, counts, activation, **_):
        return experts_mlp_gather(x, w, experts.long(), counts, gpu_model.silu_and_mul).to(x.dtype)

    def experts_mlp_triton_union(self, x, w, experts, counts, activation, masks=None):
        z = gpu_model.silu_and_mul(torch.cat([x @ w.gate.t(), x @ w.up.t()], dim=-1))
        if not self.broken_union:  # broken: the masks are ignored, every row runs all neurons
            z = z * masks
        return z @ w.down_t


@pytest.mark.parametrize("broken_union", [False, True])
def test_check_fails_on_a_wrong_kernel(monkeypatch, broken_union):
    model = gpu_model.Llama(gpu_model.TINY, torch.float32, torch.device("cpu"), seed=0)
    monkeypatch.setattr(gpu_model, "triton_kernels", lambda: FakeKernels(broken_union))
    check = gpu_model.correctness_check(model, batch=2, prompt_len=8)
    assert check["passed"] is not broken_union
    union_error = check["logits_errors"]["triton_union_vs_gather"]
    if broken_union:
        assert union_error > 10 * check["logits_tolerance"]
        assert check["layer_errors"]["triton_union_vs_gather"] > 10 * check["layer_tolerance"]
    else:
        assert union_error < check["logits_tolerance"]
    # The per-row stand-in is right either way.
    assert check["logits_errors"]["triton_vs_gather"] < check["logits_tolerance"]


def test_decode_path_choice():
    D, k = 14336, 7168
    assert gpu_model.decode_path("union", 1, D, k) == "triton"
    assert gpu_model.decode_path("union", 4, D, k) == "triton_union"
    assert gpu_model.decode_path("rows", 8, D, k) == "triton"
    # One row at d = 0.5: the engine's GPU cost model runs the per-row kernel.
    assert gpu_model.decode_path("engine", 1, D, k) == "triton"
    with pytest.raises(ValueError, match="path='x' is invalid"):
        gpu_model.decode_path("x", 1, D, k)


def test_shape_options():
    args = gpu_model.parse_args(["--tiny", "--device", "cpu", "--layers", "3", "--kv-heads", "1",
                                 "--batches", "1,4", "--densities", "0.5"])
    assert args.shape == gpu_model.Shape(hidden=64, ffn=256, layers=3, heads=4, kv_heads=1, vocab=256)
    assert args.batches == [1, 4] and args.densities == [0.5]
    assert args.dtype == torch.float32 and args.graphs is False
    assert gpu_model.parse_args(["--device", "cpu"]).shape == gpu_model.LLAMA3_8B
    with pytest.raises(SystemExit):
        gpu_model.parse_args(["--tiny", "--device", "cpu", "--heads", "3"])
