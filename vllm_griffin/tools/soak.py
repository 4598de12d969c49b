"""`vllm-griffin soak`: a GRIFFIN server on loopback under mixed traffic for a bounded time.

    vllm-griffin soak [--minutes 10] [--model smollm2-135m-instruct] [--out soak.json]

Traffic, from ``--concurrency`` clients until the time is up: completions and chat,
streaming and not, random prompt and output lengths, random densities (some dense)
and methods, about ``--abort-share`` of the streams closed mid-stream, and
``--bad-share`` of requests with a bad GRIFFIN option (each must get HTTP 400; an error
event inside a stream, naming the option, is counted apart: what vLLM alone would do,
since it validates after a stream's 200 header, and GRIFFIN checks before it). The
KV cache is kept small (``--kv-blocks``) so vLLM preempts.

Once per ``--interval`` it samples the server's RSS (server and engine processes),
GRIFFIN's slot and accumulator pools and the live requests (``/metrics``), and the
generated tokens per second. It fails (exit 1) when

* a request fails other than with the intended 400s;
* the slots in use exceed the live requests in two samples running, or any slot or
  accumulator is still held once the traffic has stopped;
* the RSS grows over the second half by more than ``--rss-growth`` (a fraction) beyond
  what plain vLLM grew under the same traffic (``--rss-baseline``: the JSON of a
  ``--without-griffin`` run; vLLM's own server grows a few percent in ten minutes);
* a sample of completed greedy requests gives other tokens when run again alone, beyond
  a near-tie where the two part (top-2 log-prob margin under 0.1), unless both runs
  selected the same experts and the parting is `gated`'s: its per-token choice among
  the experts ranks float32 gates that vLLM's GEMM (in a batch) and GRIFFIN's kernel
  (alone) sum in other orders, so a near-tie there flips (reported, not failed); or the
  two selections differ only by a float near-tie of the prompt statistic.

The figures are printed and written to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_griffin.tools.server_process import ServerProcess

WORDS = ("the river model cache token server layer expert neuron prompt answer quick brown fox jumps over "
         "lazy dog python function returns value every night stars shine above quiet town people walk home "
         "tell story about small robot learning paint").split()
DENSITIES = (None, 0.25, 0.5, 0.75, 1.0)  # None: the engine's
METHODS = (None, "topk", "gated", "magnitude", "topk_magnitude")
# As the OpenAI server takes them: flat `griffin_*` keys in `vllm_xargs` (a top-level
# "griffin" object in the JSON body is not a field of vLLM's requests: vLLM ignores it).
BAD_OPTIONS = ({"griffin_density": 7}, {"griffin_method": "bogus"}, {"griffin_densty": 0.5},
               {"griffin_refresh": -1}, {"griffin_loop_guard": 1})


@dataclass
class Sample:
    seconds: float
    rss_mib: float
    slots_in_use: float
    accumulators_in_use: float
    griffin_requests_live: float
    running: float
    waiting: float
    tokens_per_s: float
    preemptions: float


@dataclass
class Tally:
    ok: int = 0
    aborted: int = 0
    rejected_as_intended: int = 0   # HTTP 400
    rejected_in_stream: int = 0     # a bad stream's error event naming the option (no 400 possible)
    errors: list[str] = field(default_factory=list)
    greedy: list[dict] = field(default_factory=list)  # completed greedy requests, to re-run alone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-griffin soak", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("soak", help="a GRIFFIN server under mixed traffic for a bounded time; fails on "
                                           "leaks, errors or changed answers")
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded model name or a HF folder")
    p.add_argument("--minutes", type=float, default=10.0, help="traffic time (default 10)")
    p.add_argument("--interval", type=float, default=15.0, help="seconds between samples")
    p.add_argument("--concurrency", type=int, default=12, help="clients sending at once")
    p.add_argument("--abort-share", type=float, default=0.2, help="streams closed mid-stream")
    p.add_argument("--bad-share", type=float, default=0.05, help="requests with a bad GRIFFIN option (400)")
    p.add_argument("--max-tokens", type=int, default=96, help="longest output asked for")
    p.add_argument("--kv-blocks", type=int, default=24,
                   help="KV blocks of 32 tokens; one less is the longest request (small: vLLM preempts)")
    p.add_argument("--check-alone", type=int, default=6, help="completed greedy requests re-run alone at the end")
    p.add_argument("--rss-growth", type=float, default=0.05,
                   help="largest RSS growth over the second half, as a fraction (default 0.05)")
    p.add_argument("--rss-baseline", default=None, metavar="JSON",
                   help="a --without-griffin run's --out: its second-half RSS growth is allowed on top")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON with every sample and the verdict")
    p.add_argument("--without-griffin", action="store_true",
                   help="control run: plain `vllm serve` (plugin not switched on), the same traffic without "
                        "GRIFFIN options or bad requests; for comparing RSS and throughput")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `vllm serve` argument (repeatable), e.g. --server-arg=--enable-prefix-caching")


def run(args: argparse.Namespace) -> int:
    for name, value, low, high in (("--minutes", args.minutes, 0.0, 10_000.0),
                                   ("--abort-share", args.abort_share, 0.0, 1.0),
                                   ("--bad-share", args.bad_share, 0.0, 1.0)):
        if not low <= value <= high or (name == "--minutes" and value == 0):
            raise SystemExit(f"{name} {value} is out of range; allowed: {low} < value <= {high}"
                             if name == "--minutes" else f"{name} {value}; allowed: {low}..{high}")
    if args.without_griffin:
        args.bad_share = 0.0  # nothing checks GRIFFIN's options without GRIFFIN
    server = Server(args).start()
    try:
        report = asyncio.run(_soak(args, server))
    finally:
        server.stop()
    report["server_log"] = str(server.log_path)
    _print(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0 if report["passed"] else 1


# -- the server -------------------------------------------------------------------------

class Server(ServerProcess):
    """``vllm serve MODEL --plugin griffin`` on a free loopback port, in its own session."""

    def __init__(self, args: argparse.Namespace):
        from vllm_griffin.tools.models import MODELS, prepare_model

        model = str(prepare_model(args.model)) if args.model in MODELS else args.model
        exe = Path(sys.executable).with_name("vllm")
        plugin = [] if args.without_griffin else ["--plugin", "griffin"]
        command = [str(exe) if exe.exists() else "vllm", "serve", model, *plugin,
                   "--served-model-name", "soak", "--dtype", "float32", "--enforce-eager", "--seed", "0",
                   "--block-size", "32", "--num-gpu-blocks-override", str(args.kv_blocks),
                   "--max-model-len", str(32 * (args.kv_blocks - 1)), "--max-num-seqs", "64",
                   "--disable-uvicorn-access-log", *args.server_arg]
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", **os.environ}
        # Every request's experts and statistic (VLLM_GRIFFIN_EXPORT_DIR): where a greedy answer
        # parts from its alone run, they tell a float near-tie in the selection from a fault.
        self.export_dir = None if args.without_griffin else Path(tempfile.mkdtemp(prefix="vllm-griffin-soak-experts-"))
        if self.export_dir is not None:
            env["VLLM_GRIFFIN_EXPORT_DIR"] = str(self.export_dir)
        super().__init__(command, Path(tempfile.gettempdir()) / f"vllm-griffin-soak-{os.getpid()}.log", env)

    def start(self, timeout: float = 600.0) -> Server:
        print(f"soak: starting {' '.join(self.command)} (log: {self.log_path})", flush=True)
        super().start(timeout)
        return self

    def stop(self) -> None:
        super().stop()
        if self.export_dir is not None:
            shutil.rmtree(self.export_dir, ignore_errors=True)

    def rss_mib(self) -> float:
        """Resident memory of the server and all its children (the engine core)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    async def metrics(self, http) -> dict[str, float]:
        """/metrics summed per sample name (over labels)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = (await http.get(self.base + "/metrics", timeout=60)).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
        return out


# -- traffic ------------------------------------------------------------------------------

def _request(rng: random.Random, args: argparse.Namespace) -> dict:
    bad = rng.random() < args.bad_share
    options: dict = {}
    if bad:
        options = rng.choice(BAD_OPTIONS)
    else:
        density, method = rng.choice(DENSITIES), rng.choice(METHODS)
        if density is not None:
            options["griffin_density"] = density
        if method is not None:
            options["griffin_method"] = method
    if args.without_griffin:
        options = {}  # drawn all the same: the control's traffic follows the same random stream
    stream = rng.random() < 0.5
    return {
        "chat": rng.random() < 0.5,
        "stream": stream,
        # Half the requests stream: closing that share of them closes ``abort_share`` of all.
        "abort": stream and not bad and rng.random() < min(1.0, args.abort_share / 0.5),
        # Up to ~350 tokens with a chat template, + max_tokens: inside one 24-block request.
        "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 250))),
        "max_tokens": rng.randint(4, args.max_tokens),
        "greedy": rng.random() < 0.7,
        "extra_body": options,
        "bad": bad,
    }


async def _send(client, req: dict) -> list[str] | list[tuple[str, float]] | None:
    """The request's text pieces; None when it was closed mid-stream on purpose. A greedy
    request that does not stream: (token, top-1 minus top-2 logprob) per generated token."""
    # No per-request seed: vLLM 0.32's CPU runner fails seeded requests prefilled in chunks.
    common = dict(model="soak", max_tokens=req["max_tokens"], temperature=0.0 if req["greedy"] else 0.8,
                  extra_body={"vllm_xargs": req["extra_body"]} if req["extra_body"] else None)
    margins = req["greedy"] and not req["stream"]
    if req["chat"]:
        messages = [{"role": "user", "content": req["prompt"]}]
        if not req["stream"]:
            if margins:
                out = await client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2,
                                                           **common)
                req["response_id"] = out.id
                return [(t.token, _margin([c.logprob for c in t.top_logprobs]))
                        for t in out.choices[0].logprobs.content]
            out = await client.chat.completions.create(messages=messages, **common)
            return [out.choices[0].message.content or ""]
        stream = await client.chat.completions.create(messages=messages, stream=True, **common)
        pick = lambda chunk: chunk.choices[0].delta.content if chunk.choices else None  # noqa: E731
    else:
        if not req["stream"]:
            if margins:
                out = await client.completions.create(prompt=req["prompt"], logprobs=2, **common)
                req["response_id"] = out.id
                lp = out.choices[0].logprobs
                return [(t, _margin(list(top.values()))) for t, top in zip(lp.tokens, lp.top_logprobs)]
            out = await client.completions.create(prompt=req["prompt"], **common)
            return [out.choices[0].text]
        stream = await client.completions.create(prompt=req["prompt"], stream=True, **common)
        pick = lambda chunk: chunk.choices[0].text if chunk.choices else None  # noqa: E731
    pieces = []
    async for chunk in stream:
        piece = pick(chunk)
        if piece:
            pieces.append(piece)
        if req["abort"] and len(pieces) >= 2:
            await stream.close()  # the server sees the client go away and aborts the request
            return None
    return pieces


async def _client_loop(client, rng: random.Random, args, deadline: float, tally: Tally) -> None:
    import openai

    while time.monotonic() < deadline:
        req = _request(rng, args)
        try:
            pieces = await _send(client, req)
        except openai.BadRequestError as exc:
            if req["bad"]:
                tally.rejected_as_intended += 1
            else:
                tally.errors.append(f"unexpected 400 for {req['extra_body']}: {exc}")
            continue
        except openai.APIError as exc:
            # vLLM validates a request's extra_args when the engine takes it, which for a
            # stream is after the 200 header: the rejection comes as the stream's error event.
            if req["bad"] and req["stream"] and _names_option(str(exc), req["extra_body"]):
                tally.rejected_in_stream += 1
            else:
                tally.errors.append(f"{type(exc).__name__}: {exc} ({req['extra_body']}, stream={req['stream']})")
            continue
        except Exception as exc:  # noqa: BLE001 - every other failure is a finding
            tally.errors.append(f"{type(exc).__name__}: {exc} ({req['extra_body']}, stream={req['stream']})")
            continue
        if req["bad"]:
            tally.errors.append(f"bad options accepted: {req['extra_body']}")
        elif pieces is None:
            tally.aborted += 1
        else:
            tally.ok += 1
            if req["greedy"] and not req["stream"]:
                tally.greedy.append({**req, "tokens": pieces})


async def _soak(args: argparse.Namespace, server: Server) -> dict:
    import httpx
    import openai

    rng = random.Random(args.seed)
    client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=600)
    tally, samples = Tally(), []
    start = time.monotonic()
    deadline = start + 60 * args.minutes
    async with httpx.AsyncClient() as http:
        clients = [asyncio.create_task(_client_loop(client, random.Random(rng.random()), args, deadline, tally))
                   for _ in range(args.concurrency)]
        last_tokens, last_time = None, None
        over_in_a_row, slot_findings = 0, []
        while not all(c.done() for c in clients):
            await asyncio.wait(clients, timeout=args.interval)
            m = await server.metrics(http)
            now = time.monotonic()
            tokens = m.get("vllm:generation_tokens_total", 0.0)
            rate = 0.0 if last_tokens is None else (tokens - last_tokens) / max(1e-9, now - last_time)
            last_tokens, last_time = tokens, now
            s = Sample(seconds=round(now - start, 1), rss_mib=round(server.rss_mib(), 1),
                       slots_in_use=m.get("vllm:griffin_slots_in_use", -1),
                       accumulators_in_use=m.get("vllm:griffin_accumulators_in_use", -1),
                       griffin_requests_live=m.get("vllm:griffin_requests_live", -1),
                       running=m.get("vllm:num_requests_running", 0), waiting=m.get("vllm:num_requests_waiting", 0),
                       tokens_per_s=round(rate, 2), preemptions=m.get("vllm:num_preemptions_total", 0))
            samples.append(s)
            print(f"soak: {s.seconds:7.1f} s  rss {s.rss_mib:8.1f} MiB  slots {s.slots_in_use:3.0f}  "
                  f"accumulators {s.accumulators_in_use:3.0f}  live {s.running + s.waiting:3.0f}  "
                  f"{s.tokens_per_s:6.1f} tok/s  preemptions {s.preemptions:.0f}  ok {tally.ok} "
                  f"aborted {tally.aborted} rejected {tally.rejected_as_intended + tally.rejected_in_stream} "
                  f"errors {len(tally.errors)}", flush=True)
            # The worker hears of finishes and aborts a step after the front end: one sample
            # over may be that lag, two in a row are not.
            over = s.slots_in_use > s.running + s.waiting
            over_in_a_row = over_in_a_row + 1 if over else 0
            if over_in_a_row == 2:
                slot_findings.append(f"{s.slots_in_use:.0f} slots in use for {s.running + s.waiting:.0f} "
                                     f"live requests at {s.seconds} s (two samples running)")
        await asyncio.gather(*clients)
        # Idle: everything must have been given back.
        await asyncio.sleep(2)
        idle = await server.metrics(http)
        alone = await _check_alone(client, tally, args.check_alone, rng, griffin=not args.without_griffin,
                                   export_dir=server.export_dir)
    return _verdict(args, tally, samples, idle, alone, slot_findings)


# Greedy answers may part where the top two tokens are this close (log-probability):
# float32 sums in another batch order can flip such a choice, GRIFFIN or not.
NEAR_TIE = 0.1  # as the engine's oracle tests (tests/oracle.py)


# Largest difference between two runs' statistics, relative to each layer's largest value,
# that float32 sums in another order explain (they differ around 1e-7 relative).
STATISTIC_ROUNDING = 1e-4


def _selection_difference(export_dir: Path, first_id: str | None, again_id: str | None) -> dict | None:
    """Whether two runs of one request selected the same experts, and how far apart their
    statistics are (largest difference over each layer's largest value); None without both
    exports (a dense or static-method request selects from no statistic)."""
    from vllm_griffin.core.export import read_experts, read_statistic

    paths = []
    for rid in (first_id, again_id):
        found = sorted(export_dir.glob(f"{rid}*.safetensors")) if rid else []
        if len(found) != 1:
            return None
        paths.append(found[0])
    (a, _), (b, _) = (read_experts(p) for p in paths)
    sa, sb = (read_statistic(p) for p in paths)
    out = {"experts_same": all(x.tolist() == y.tolist() for x, y in zip(a, b)),
           "differing_experts": sum(len(set(x.tolist()) ^ set(y.tolist())) // 2 for x, y in zip(a, b))}
    if sa is not None and sb is not None:
        scale = sa.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        out["statistic_difference"] = float(((sa - sb).abs() / scale).max())
    else:
        out["statistic_difference"] = float("inf")
    return out


def _names_option(message: str, options: dict) -> bool:
    return any(key in message for key in options) and "allowed" in message


def _margin(logprobs: list[float]) -> float:
    top = sorted(logprobs, reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


async def _check_alone(client, tally: Tally, count: int, rng: random.Random, griffin: bool = True,
                       export_dir: Path | None = None) -> list[dict]:
    """Re-run completed greedy requests one at a time on the idle server: the same tokens, up
    to the first near-tie (in either run) where they part."""
    checked = []
    for req in rng.sample(tally.greedy, min(count, len(tally.greedy))):
        rerun = {**req, "abort": False}
        again = await _send(client, rerun)
        first, parted = req["tokens"], None
        for i, ((a, _), (b, _)) in enumerate(zip(first, again)):
            if a != b:
                parted = i
                break
        if parted is None and len(first) != len(again):
            parted = min(len(first), len(again))
        options = req["extra_body"] or {}
        gated = griffin and options.get("griffin_method", "gated") == "gated"  # the default
        # Refreshing (gated's default): a recompute after preemption replays its expert history.
        refreshing = gated and options.get("griffin_density", 0.5) != 1.0
        tie = parted is not None and parted < min(len(first), len(again)) and min(
            first[parted][1], again[parted][1]) < NEAR_TIE
        margins = None
        if parted is not None and parted < min(len(first), len(again)):
            margins = [round(first[parted][1], 4), round(again[parted][1], 4)]
        selection = None
        if parted is not None and not tie and export_dir is not None:
            selection = _selection_difference(export_dir, req.get("response_id"), rerun.get("response_id"))
        checked.append({"prompt_words": len(req["prompt"].split()), "options": req["extra_body"],
                        "chat": req["chat"], "tokens": len(first), "parted_at": parted,
                        "margins_where_parted": margins, "same": parted is None or tie, "near_tie": tie,
                        "refreshing": refreshing, "selection": selection,
                        # Experts that differ while the statistics agree to float rounding: the
                        # prompt's sums in another batch order flipped a near-tie at the top-k edge.
                        "selection_near_tie": bool(selection and not selection["experts_same"]
                                                   and selection["statistic_difference"] <= STATISTIC_ROUNDING),
                        # `gated` parting with its experts (pool) selected exactly alike: a flip
                        # in its per-token choice among them (float32 gates summed in another order).
                        "gated_token_choice": bool(gated and selection and selection["experts_same"])})
    return checked


def _verdict(args, tally: Tally, samples: list[Sample], idle: dict, alone: list[dict],
             slot_findings: list[str]) -> dict:
    findings = list(tally.errors[:20]) + slot_findings
    if len(tally.errors) > 20:
        findings.append(f"... and {len(tally.errors) - 20} more request errors")
    held = {key: idle.get(f"vllm:griffin_{key}", -1) for key in ("slots_in_use", "accumulators_in_use",
                                                                   "requests_live")}
    if getattr(args, "without_griffin", False):
        held = {}  # no GRIFFIN pools to look at
    if any(v != 0 for v in held.values()):
        findings.append(f"still held once idle: {held}")
    half = [s for s in samples if s.seconds >= samples[-1].seconds / 2] if samples else []
    growth = 0.0
    if len(half) >= 2 and half[0].rss_mib > 0:
        growth = (_slope([s.seconds for s in half], [s.rss_mib for s in half])
                  * (half[-1].seconds - half[0].seconds) / half[0].rss_mib)
        baseline = _baseline_growth(getattr(args, "rss_baseline", None))
        if growth > args.rss_growth + baseline:
            findings.append(f"RSS grew {100 * growth:.1f} % over the second half (allowed "
                            f"{100 * args.rss_growth:.0f} %"
                            + (f" + plain vLLM's {100 * baseline:.1f} %" if baseline else "")
                            + ")")
    changed = [a for a in alone
               if not a["same"] and not a.get("selection_near_tie") and not a.get("gated_token_choice")]
    if changed:
        findings.append(f"{len(changed)} of {len(alone)} greedy requests answered differently alone: {changed}")
    if tally.ok == 0:
        findings.append("no request completed")
    return {
        "command": "soak", "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "passed": not findings, "findings": findings,
        "requests": {"completed": tally.ok, "aborted_mid_stream": tally.aborted,
                     "rejected_400_as_intended": tally.rejected_as_intended,
                     "rejected_in_stream_as_intended": tally.rejected_in_stream, "errors": len(tally.errors)},
        "preemptions": samples[-1].preemptions if samples else 0,
        "rss_mib": {"first": samples[0].rss_mib if samples else None, "last": samples[-1].rss_mib if samples else None,
                    "second_half_growth": round(growth, 4)},
        "mean_tokens_per_s": round(sum(s.tokens_per_s for s in samples[1:]) / max(1, len(samples) - 1), 2),
        "idle": held, "alone_checks": alone, "samples": [asdict(s) for s in samples],
    }


def _baseline_growth(path: str | None) -> float:
    if not path:
        return 0.0
    report = json.loads(Path(path).read_text())
    if not report.get("settings", {}).get("without_griffin"):
        raise SystemExit(f"--rss-baseline {path}: not a --without-griffin run")
    return max(0.0, float(report["rss_mib"]["second_half_growth"]))


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def _print(report: dict) -> None:
    r = report["requests"]
    print(f"\nsoak {'PASSED' if report['passed'] else 'FAILED'}: {r['completed']} completed, "
          f"{r['aborted_mid_stream']} closed mid-stream, {r['rejected_400_as_intended']} bad requests rejected "
          f"with 400 and {r['rejected_in_stream_as_intended']} bad streams with an error event, {r['errors']} errors; "
          f"{report['preemptions']:.0f} preemptions; RSS "
          f"{report['rss_mib']['first']} -> {report['rss_mib']['last']} MiB (second half "
          f"{100 * report['rss_mib']['second_half_growth']:+.1f} %); {report['mean_tokens_per_s']} tok/s; "
          f"{sum(a['same'] for a in report['alone_checks'])}/{len(report['alone_checks'])} greedy answers the same "
          f"alone ({sum(a['same'] for a in report['alone_checks'] if a.get('refreshing'))} of them refreshing; "
          f"{sum(bool(a.get('selection_near_tie')) for a in report['alone_checks'])} parted after a float near-tie "
          f"in the selection, {sum(bool(a.get('gated_token_choice')) for a in report['alone_checks'])} at a `gated` "
          f"per-token choice on the same experts); "
          f"idle: {report['idle']}")
    for finding in report["findings"]:
        print(f"  - {finding}")


if __name__ == "__main__":
    sys.exit(main())
