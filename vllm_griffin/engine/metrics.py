"""GRIFFIN's Prometheus metrics on the API server's ``/metrics`` (``vllm:griffin_*``).

Two sources, because ``vllm serve`` runs in several processes:

* the API server (front end) validates every request, so it counts the requests
  that run with GRIFFIN, by method, and observes their densities
  (:func:`observe_request`, called from the request validation hook);
* the expert table and its timers live in the worker (engine-core process), so
  right before each ``/metrics`` scrape a middleware asks the worker for them
  with ``collective_rpc("griffin_stats")`` -- the route vLLM documents for a
  plugin's engine-side data -- and the scrape shows that snapshot.

One :class:`GriffinCollector` per process yields both as metric families at
scrape time (labels ``model_name`` and ``engine`` as vLLM's own metrics). It is
a custom collector rather than prometheus_client Counters because vLLM's
stat logger unregisters every ``vllm:`` Counter/Gauge it finds when it starts.

Exported (``_total``/``_sum``/``_count``/``_bucket`` suffixes as Prometheus adds them):

==========================================  ========  ==============================================
``vllm:griffin_requests_total{method}``     counter   requests accepted with GRIFFIN on
``vllm:griffin_request_density``            histogram each request's density (1.0 = dense)
``vllm:griffin_slots_in_use``               gauge     expert-table slots the slot pool handed out
``vllm:griffin_slot_capacity``              gauge     expert-table slots allocated
``vllm:griffin_requests_live``              gauge     requests the worker's GRIFFIN state holds
``vllm:griffin_accumulators_in_use``        gauge     prompt-statistic accumulators handed out
``vllm:griffin_accumulator_capacity``       gauge     prompt-statistic accumulators allocated
``vllm:griffin_block_stat_rows_written``    gauge     KV blocks whose prompt statistic was filled
``vllm:griffin_decode_union_fraction``      summary   share of FF neurons a multi-row decode layer-step
                                                      needs (union of its rows' experts; not counted
                                                      where the step's dense rows share the masked pass)
``vllm:griffin_decode_layer_steps_total``   counter   decode layer-steps by kernel path
``vllm:griffin_capture_seconds_total``      counter   worker time adding prompt statistics
``vllm:griffin_selection_seconds_total``    counter   worker time selecting experts
==========================================  ========  ==============================================

Limits: with ``--api-server-count > 1`` vLLM serves /metrics from Prometheus'
multiprocess files, which this collector does not write, so nothing of GRIFFIN's
is exported there (serving.warn_api_server_count says so once at start-up); with data
parallelism the worker figures are engine 0's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import threading
from typing import Any

from vllm_griffin.core.config import GriffinConfig, RequestOptions

logger = logging.getLogger("vllm.griffin.metrics")

PREFIX = "vllm:griffin_"
DENSITY_BUCKETS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0)
RPC_TIMEOUT_S = 5.0
_API_ENTRY_MODULE = "vllm.entrypoints.launchers.api_server.entry"


class GriffinCollector:
    """Front-end request counts plus the worker's latest snapshot, as Prometheus families."""

    def __init__(self):
        self._lock = threading.Lock()
        self.model_name = ""
        self.engine = "0"
        self.requests_by_method: dict[str, int] = {}
        self.density_bucket_counts = [0] * len(DENSITY_BUCKETS)  # non-cumulative
        self.density_sum = 0.0
        self.density_count = 0
        self.worker: dict[str, Any] | None = None  # last griffin_stats() answer

    def observe(self, method: str, density: float) -> None:
        with self._lock:
            self.requests_by_method[method] = self.requests_by_method.get(method, 0) + 1
            for i, bound in enumerate(DENSITY_BUCKETS):
                if density <= bound:
                    self.density_bucket_counts[i] += 1
                    break
            self.density_sum += density
            self.density_count += 1

    async def refresh(self, engine_client) -> None:
        """Replace the worker snapshot (called right before a scrape)."""
        try:
            results = await asyncio.wait_for(
                engine_client.collective_rpc("griffin_stats", timeout=RPC_TIMEOUT_S), RPC_TIMEOUT_S)
        except Exception as exc:  # a dead or stuck engine must not break /metrics
            logger.warning("GRIFFIN: worker metrics not refreshed (%s: %s)", type(exc).__name__, exc)
            return
        if results:
            self.worker = results[0]  # tensor-parallel ranks hold the same requests

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            SummaryMetricFamily,
        )

        labels = ["model_name", "engine"]
        values = [self.model_name, self.engine]
        with self._lock:
            requests = CounterMetricFamily(
                PREFIX + "requests", "Requests accepted with GRIFFIN on, by expert selection method.",
                labels=labels + ["method"])
            for method, count in sorted(self.requests_by_method.items()):
                requests.add_metric(values + [method], count)
            yield requests
            cumulative, buckets = 0, []
            for bound, count in zip(DENSITY_BUCKETS, self.density_bucket_counts):
                cumulative += count
                buckets.append((repr(bound), cumulative))
            buckets.append(("+Inf", self.density_count))
            density = HistogramMetricFamily(
                PREFIX + "request_density", "GRIFFIN density of each request (fraction of FF neurons kept).",
                labels=labels)
            density.add_metric(values, buckets, self.density_sum)
            yield density
        worker = self.worker
        if worker is None:
            return
        for name, doc, key in (
            ("slots_in_use", "Expert-table slots the worker's slot pool has handed out.", "slots_in_use"),
            ("slot_capacity", "Expert-table slots allocated in the worker.", "slot_capacity"),
            ("requests_live", "Requests the worker's GRIFFIN state holds.", "requests_live"),
            ("accumulators_in_use", "Prompt-statistic accumulators handed out (prompts being read, refreshes).",
             "acc_in_use"),
            ("accumulator_capacity", "Prompt-statistic accumulators allocated in the worker.", "acc_capacity"),
            ("block_stat_rows_written", "KV blocks whose prompt statistic the worker has filled (prefix caching).",
             "block_stat_rows_written"),
        ):
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            gauge.add_metric(values, worker.get(key, 0))
            yield gauge
        union = SummaryMetricFamily(
            PREFIX + "decode_union_fraction",
            "Share of a layer's FF neurons needed by a decode step with several rows (union of their experts).",
            labels=labels)
        union.add_metric(values, worker.get("union_samples", 0), worker.get("union_fraction_sum", 0.0))
        yield union
        paths = CounterMetricFamily(PREFIX + "decode_layer_steps", "GRIFFIN decode layer-steps by kernel path.",
                                    labels=labels + ["path"])
        for path, count in sorted(worker.get("decode_paths", {}).items()):
            paths.add_metric(values + [path], count)
        yield paths
        for name, doc, key in (
            ("capture_seconds", "Worker time adding prompt tokens to the GRIFFIN statistic.", "capture_seconds"),
            ("selection_seconds", "Worker time selecting each request's experts.", "select_seconds"),
        ):
            counter = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            counter.add_metric(values, worker.get(key, 0.0))
            yield counter


COLLECTOR = GriffinCollector()
_registered = False


def observe_request(config: GriffinConfig, options: RequestOptions) -> None:
    """Count one request the front end accepted (engine config + the request's own options)."""
    method = options.method or config.method
    if options.density is not None:
        density = options.density
    elif config.densities:
        density = sum(config.densities) / len(config.densities)
    else:
        density = config.density
    COLLECTOR.observe(method, density)


# -- API server hooks ----------------------------------------------------------------------

def install_frontend_hooks(vllm_config) -> None:
    """In an API server process: put the collector on /metrics and refresh it per scrape.

    Called when a GRIFFIN engine config is created; does nothing elsewhere (``LLM(...)``).
    """
    COLLECTOR.model_name = vllm_config.model_config.served_model_name
    COLLECTOR.engine = str(getattr(vllm_config.parallel_config, "data_parallel_rank", 0) or 0)
    entry = sys.modules.get(_API_ENTRY_MODULE)
    if entry is None:
        return
    original = getattr(entry, "build_app", None)
    if original is None:
        from vllm_griffin.engine.compat import compat_error

        logger.warning("%s GRIFFIN's worker metrics are not on /metrics.",
                       compat_error(f"{_API_ENTRY_MODULE}.build_app"))
        return
    if getattr(original, "_griffin_wrapped", False):
        return

    @functools.wraps(original)
    def build_app(*args, **kwargs):
        app = original(*args, **kwargs)
        _register_collector()
        # vLLM serves /metrics from a route (and a mount): each first refreshes the snapshot.
        # (Route-level, because the app's middleware stack is already built here.)
        wrapped = 0
        for route in app.routes:
            if getattr(route, "path", None) == "/metrics" and hasattr(route, "app"):
                route.app = _RefreshWorkerStatsFirst(route.app, app.state)
                wrapped += 1
        if not wrapped:
            logger.warning("GRIFFIN: no /metrics route found; worker metrics will not be refreshed")
        return app

    build_app._griffin_wrapped = True
    entry.build_app = build_app


def _register_collector() -> None:
    global _registered
    if not _registered:
        from prometheus_client import REGISTRY

        REGISTRY.register(COLLECTOR)
        _registered = True


class _RefreshWorkerStatsFirst:
    """ASGI wrapper of vLLM's /metrics handler: refresh the worker snapshot, then answer."""

    def __init__(self, app, state):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        engine_client = getattr(self.state, "engine_client", None)
        if scope["type"] == "http" and engine_client is not None:
            await COLLECTOR.refresh(engine_client)
        await self.app(scope, receive, send)
