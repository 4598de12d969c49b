"""`vllm-griffin eval humaneval`: the sandboxed executor (no engine), the input errors,
the summary and files from hand-made samples, and one small run on a real engine (SmolLM2)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_engine_command
from vllm_griffin.tools import eval_humaneval as he
from vllm_griffin.tools.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def problem() -> dict:
    return he.load_problems(0, 1)[0]


def test_problems_and_program_layout():
    everything = he.load_problems()
    assert len(everything) == 164 and everything[0]["task_id"] == "HumanEval/0"
    second_half = he.load_problems(82, 82)
    assert [p["index"] for p in second_half] == list(range(82, 164))
    assert second_half[-1]["task_id"] == "HumanEval/163"
    p = everything[0]
    assert he.check_program(p, "BODY") == f"{p['prompt']}BODY\n{p['test']}\ncheck({p['entry_point']})\n"


def test_correct_passes_wrong_fails(problem):
    ok = he.execute(he.check_program(problem, problem["canonical_solution"]))
    assert ok["passed"] and ok["result"] == "passed"
    wrong = he.execute(he.check_program(problem, "    return False\n"))
    assert not wrong["passed"] and wrong["result"].startswith("failed: AssertionError")
    broken = he.execute(he.check_program(problem, "    return (\n"))
    assert not broken["passed"] and broken["result"].startswith("failed: SyntaxError")


def test_hostile_completions_fail_and_the_run_goes_on(problem, tmp_path):
    """Everything that is not check() returning is a failure, and none of it stops or hangs the
    batch: the hang is cut at the timeout, the others end at once."""
    fake_report = (f"    open('report', 'w').write('{'0' * 32} passed')\n"  # the harness's format, a guessed nonce
                   "    print('passed')\n    import os; os._exit(0)\n")
    hostile = {
        "loop": "    while True:\n        pass\n",
        "exit": "    exit()\n",
        "sys.exit": "    import sys; sys.exit(0)\n",
        "os._exit": "    import os; os._exit(0)\n",
        "quit": "    quit()\n",
        "segfault": "    import ctypes; ctypes.string_at(0)\n",
        "fake marker": fake_report,
        # passes the function, then leaves with code 0 before the tests ran
        "exit after a good body": problem["canonical_solution"] + "import os\nos._exit(0)\n",
        "memory hog": "    x = bytearray(64 << 30)\n    return True\n",
        "stdin": "    input()\n",
    }
    started = time.perf_counter()
    results = he.execute_all([he.check_program(problem, c) for c in hostile.values()], timeout=3.0, workers=2,
                             progress=False)
    elapsed = time.perf_counter() - started
    by_name = dict(zip(hostile, results))
    assert all(not r["passed"] and r["result"] != "passed" for r in results), by_name
    # Bounds against a hang, loose enough for a loaded 2-core machine (interpreter starts are slow).
    assert by_name["loop"]["result"] == "timed out" and by_name["loop"]["seconds"] < 3.0 + 10.0
    assert by_name["segfault"]["result"] == "failed: killed by SIGSEGV"
    assert by_name["os._exit"]["result"].startswith("failed: exited with code 0")
    assert by_name["exit"]["result"].startswith("failed: SystemExit")
    assert by_name["memory hog"]["result"].startswith("failed: MemoryError")
    assert elapsed < 3.0 + 40.0  # the loop's timeout, plus the rest with two workers
    # A good program right after still passes.
    assert he.execute(he.check_program(problem, problem["canonical_solution"]))["passed"]


def test_timeout_kills_the_whole_process_group(problem, tmp_path):
    """A completion that forks (behind the guard's back, through libc) and spins in both
    processes: after the timeout neither is left running."""
    body = (f"    import ctypes, os\n"
            f"    pid = ctypes.CDLL(None).fork()\n"
            f"    if pid == 0:\n"
            f"        open({str(tmp_path / 'child')!r}, 'w').write(str(os.getpid()))\n"
            f"    while True:\n        pass\n")
    result = he.execute(he.check_program(problem, body), timeout=2.0)
    assert result["result"] == "timed out"
    child = int((tmp_path / "child").read_text())
    deadline = time.time() + 5
    while time.time() < deadline and _running(child):
        time.sleep(0.1)
    assert not _running(child)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie waiting for its reaper is gone already


def test_bad_inputs_name_the_value(capsys):
    base = ["eval", "humaneval", "--model", "smollm2-135m-instruct"]
    cases = [
        (["--methods", "topk,nope"], ["'nope'", "topk_magnitude"]),
        (["--densities", "0.5,2"], ["'2'", "0 < d <= 1"]),
        (["--start", "164"], ["--start 164", "0 <= start < 164"]),
        (["--limit", "0"], ["--limit 0", "positive"]),
        (["--max-tokens", "0"], ["--max-tokens 0"]),
        (["--timeout", "0"], ["--timeout 0", "seconds > 0"]),
        (["--workers", "0"], ["--workers 0"]),
        (["--request-options", "{nope"], ["--request-options", "not JSON"]),
        (["--request-options", "[1]"], ["[1]", "JSON object"]),
        (["--request-options", '{"density": 0.3}'], ["'density'", "--densities"]),
        (["--request-options", '{"no_such_key": 1}'], ["no_such_key", "allowed"]),
    ]
    for extra, wanted in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert all(w in err for w in wanted), (extra, err)
    assert main(["eval", "humaneval", "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def _sample(method, density, problem, completion, passed):
    return {"method": method, "density": density, "options": {}, "problem": problem, "task_id": f"HumanEval/{problem}",
            "request_id": "x", "generated_tokens": 10, "finish_reason": "stop", "completion": completion,
            "passed": passed, "result": "passed" if passed else "failed: AssertionError: ", "check_s": 0.1}


def test_summary_and_files(tmp_path):
    samples = [_sample("full", 1.0, 0, "a", True), _sample("full", 1.0, 1, "b", True),
               _sample("topk", 0.5, 0, "a", True), _sample("topk", 0.5, 1, "c", False),
               {**_sample("topk", 0.5, 0, "a", False), "options": {"refresh": 16}},
               {**_sample("topk", 0.5, 1, "b", True), "options": {"refresh": 16}}]
    summary = he.summarize(samples)
    cells = {(e["method"], e["density"], json.dumps(e["options"])): e for e in summary}
    assert cells[("full", 1.0, "{}")]["pass_at_1"] == 1.0
    topk = cells[("topk", 0.5, "{}")]
    assert (topk["solved"], topk["n"], topk["pass_at_1"], topk["pass_at_1_retained"], topk["identical_to_full"]) == \
        (1, 2, 0.5, 0.5, 1)
    assert cells[("topk", 0.5, '{"refresh": 16}')]["identical_to_full"] == 2
    result = {"model": "m", "problems": [0, 1], "max_tokens": 8, "timeout_s": 10.0, "summary": summary,
              "samples": samples, "runs": []}
    out = tmp_path / "h.json"
    he.write_outputs(result, out)
    md = out.with_suffix(".md").read_text()
    assert "| topk | 0.5 | 1 | 2 | 50.0 % | 50 % | 1/2 |" in md and 'topk {"refresh":16}' in md
    assert out.with_suffix(".png").stat().st_size > 0


def test_append_replaces_only_the_cells_it_ran(tmp_path):
    """--append: a rerun of a cell replaces it, other cells stay; another model or other problems is refused."""
    from vllm_griffin.tools import eval_common as quality_eval

    first = [_sample("full", 1.0, 0, "a", True), _sample("topk", 0.5, 0, "x", False)]
    result = quality_eval.merge_samples({"model": "m", "problems": [0, 0], "runs": [], "samples": []}, first, {"n": 1})
    again = [_sample("topk", 0.5, 0, "a", True), {**_sample("topk", 0.5, 0, "y", False), "options": {"refresh": 8}}]
    quality_eval.merge_samples(result, again, {"n": 2})
    assert [(s["method"], s["completion"]) for s in result["samples"]] == [("full", "a"), ("topk", "a"), ("topk", "y")]
    assert result["runs"] == [{"n": 1}, {"n": 2}]
    out = tmp_path / "h.json"
    out.write_text(json.dumps(result))
    assert quality_eval.load_previous(out, {"model": "m", "problems": [0, 0]})["samples"] == result["samples"]
    with pytest.raises(quality_eval.EvalError, match=r"problems=\[0, 0\].*\[82, 163\]"):
        quality_eval.load_previous(out, {"model": "m", "problems": [82, 163]})


@pytest.mark.slow
def test_humaneval_on_an_engine(engines, tmp_path):
    """Problems 0-1, 48 greedy tokens, dense + topk at 0.5 on SmolLM2: the JSON holds the
    real completions, each verdict is what running it again gives, and the summary
    is the mean of the verdicts."""
    out = tmp_path / "h.json"
    cmd = [sys.executable, "-m", "vllm_griffin.tools.cli", "eval", "humaneval", "--model", "smollm2-135m-instruct",
           "--limit", "2", "--methods", "full,topk", "--densities", "0.5", "--max-tokens", "48",
           "--timeout", "5", "--out", str(out)]
    proc = run_engine_command(engines, cmd, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["problems"] == [0, 1] and result["stop"] == list(he.STOP)
    run = result["runs"][0]
    assert run["requests"] == 4 and run["engine_start_s"] > 0 and run["generate_s"] > 0
    assert run["command"].startswith("vllm-griffin eval humaneval") and run["request_options"] is None
    samples = result["samples"]
    assert sorted((s["method"], s["problem"]) for s in samples) == [("full", 0), ("full", 1), ("topk", 0), ("topk", 1)]
    problems = he.load_problems(0, 2)
    # SmolLM2 is no coder: a completion may be empty (it stopped at once at a new "\ndef").
    assert any(s["completion"].strip() for s in samples)
    for s in samples:
        assert 0 < s["generated_tokens"] <= 48 and s["finish_reason"] in ("stop", "length")
        assert not any(stop in s["completion"] for stop in he.STOP)
        again = he.execute(he.check_program(problems[s["problem"]], s["completion"]), timeout=5)
        assert (again["passed"], again["result"]) == (s["passed"], s["result"])
    for e in result["summary"]:
        mine = [s for s in samples if s["method"] == e["method"]]
        assert e["n"] == 2 and e["solved"] == sum(s["passed"] for s in mine) and e["pass_at_1"] == e["solved"] / 2
    assert "| full | 1 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
