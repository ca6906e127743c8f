"""Prometheus metrics at `GET /metrics`: HTTP traffic, tokens, latency, queue and cache reuse.

Everything is collected at two shared places, so no adapter carries metrics code:

* an ASGI middleware counts requests by route template and status and times them;
* one engine observer (`Engine.add_observer`) sees every token event of every API style on
  the engine thread: per-token latency is measured where tokens are produced, and the final
  event's `Stats` gives prompt, cached and completion tokens and time to first token.

Queue depth and active requests are read from `Engine.status()` at scrape time rather than
tracked incrementally, so they can never drift. Each app owns its registry, so several apps in
one process (tests) never collide on metric names.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from litestar import Request, Response, Router, get
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from serve import access
from serve.engine import EventKind, FinishReason, TokenEvent
from serve.state import Hub

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineGauges(Collector):
    """Queue depth, active requests and busy rows, read live from the engine at scrape time."""

    def __init__(self, hub: Hub):
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        status: dict[str, Any] = self.hub.engine.status() if self.hub.engine else {}
        yield GaugeMetricFamily(
            "tsjax_queue_depth",
            "Requests waiting for a cache row",
            value=status.get("pending_requests", 0),
        )
        yield GaugeMetricFamily(
            "tsjax_active_requests",
            "Requests holding a cache row (prefilling or decoding)",
            value=status.get("active_requests", 0),
        )
        programs = self.hub.model.steps.programs if self.hub.model else None
        yield GaugeMetricFamily(
            "tsjax_compiled_programs",
            "Step programs compiled (one per shape of prefill, decode and swap)",
            value=len(programs.keys()) if programs else 0,
        )
        yield GaugeMetricFamily(
            "tsjax_compiling_programs",
            "Step programs queued for or being compiled (first use of a shape)",
            value=programs.pending() if programs else 0,
        )
        steps = self.hub.model.steps if self.hub.model else None
        yield GaugeMetricFamily(
            "tsjax_deferred_programs",
            "Shapes served by a bigger compiled program meanwhile, their own compiled once the"
            " server is idle",
            value=steps.deferred if steps else 0,
        )
        yield GaugeMetricFamily(
            "tsjax_model_ready",
            "1 once the model is loaded and compiled",
            value=int(self.hub.ready),
        )


class Metrics:
    """The app's metric families plus the two hooks that feed them."""

    def __init__(self, hub: Hub):
        self.hub = hub
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tsjax_http_requests", "HTTP requests by route and status",
            ["method", "endpoint", "status"], registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "tsjax_http_request_duration_seconds", "Time to the end of the response body",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.generations = Counter(
            "tsjax_generations", "Finished generations by finish reason", ["reason"], registry=r
        )
        self.prompt_tokens = Counter("tsjax_prompt_tokens", "Prompt tokens", registry=r)
        self.cached_tokens = Counter(
            "tsjax_prompt_cached_tokens", "Prompt tokens served from the KV cache", registry=r
        )
        self.completion_tokens = Counter("tsjax_completion_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "tsjax_time_to_first_token_seconds", "Submission to first token (queue + prefill)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.token_latency = Histogram(
            "tsjax_time_per_output_token_seconds",
            "Decode time per generated token, observed per engine dispatch",
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "tsjax_queue_wait_seconds", "Time waiting for a cache row",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(_EngineGauges(hub))
        # process_resident_memory_bytes, process_cpu_seconds_total, ... (Linux /proc)
        ProcessCollector(registry=r)
        self._instrumented: Any = None

    # -- hook 1: the engine --------------------------------------------------------------------

    def instrument(self) -> None:
        """Observe the engine's events (once per engine: the hub may get its engine late)."""
        engine = self.hub.engine
        if engine is None or self._instrumented is engine:
            return
        # per answer in flight (a request has `n`): its timing
        requests: dict[tuple[str, int], dict[str, float]] = {}

        def observe(req: Any, ev: TokenEvent) -> None:
            key = (req.id, ev.index)
            state = requests.setdefault(key, {"last": time.perf_counter()})
            if ev.kind in (EventKind.DONE, EventKind.ERROR):
                requests.pop(key, None)
            self._observe(ev, state)

        engine.add_observer(observe)
        self._instrumented = engine

    def _observe(self, ev: TokenEvent, state: dict[str, float]) -> None:
        now = time.perf_counter()
        if ev.kind is EventKind.TOKEN and ev.token_ids:
            if state.get("started"):  # the first token's gap is prefill: that is TTFT's
                gap = (now - state["last"]) / len(ev.token_ids)
                for _ in ev.token_ids:
                    self.token_latency.observe(gap)
            state["started"] = 1.0
            state["last"] = now
        elif ev.kind in (EventKind.DONE, EventKind.ERROR):
            reason = ev.finish_reason or (
                FinishReason.ERROR if ev.kind is EventKind.ERROR else FinishReason.STOP
            )
            self.generations.labels(reason=str(reason)).inc()
            s = ev.stats
            if s is None or s.prompt_tokens == 0:  # aborted while queued: nothing ran
                return
            if ev.index == 0:  # the answers of one request share its prompt
                self.prompt_tokens.inc(s.prompt_tokens)
                self.cached_tokens.inc(s.cached_tokens)
            self.completion_tokens.inc(s.completion_tokens)
            self.queue_seconds.observe(s.queue_seconds)
            if s.first_token_seconds:
                self.ttft.observe(s.first_token_seconds)

    # -- hook 2: HTTP --------------------------------------------------------------------------

    def middleware(self, app: Any) -> Any:
        """ASGI middleware counting every routed HTTP request by template and final status."""

        async def wrapped(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            self.instrument()
            began = time.perf_counter()
            status = {"code": 500}

            async def tap(message: Any) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            endpoint = scope.get("path_template") or "other"
            try:
                await app(scope, receive, tap)
            finally:
                self.requests.labels(scope["method"], endpoint, str(status["code"])).inc()
                self.request_seconds.labels(endpoint).observe(time.perf_counter() - began)

        return wrapped

    def exposition(self) -> bytes:
        self.instrument()
        return generate_latest(self.registry)


@get("/metrics", include_in_schema=False, opt={access.ACCESS: access.METRICS})
async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text format (the registry of this app only)."""
    m: Metrics = request.app.state.metrics
    return Response(m.exposition(), media_type=CONTENT_TYPE_LATEST)


router = Router(path="/", route_handlers=[metrics_endpoint])
