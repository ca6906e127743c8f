"""The Litestar application: routers for each API style, error rendering, and a lifespan that
owns the engine (load the model, compile, start; stop on shutdown).

Loading runs in the background so the listener is up at once: `/health` answers 503 until
the engine is warm, which is what load balancers and the tests poll for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import jax
from litestar import Litestar, Request, Response, get, route
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.static_files import create_static_files_router

from serve import access, metrics
from serve.engine import Engine
from serve.engine.encoder import ImageEncoder
from serve.engine.lockstep import StepChannel
from serve.errors import ApiError
from serve.protocols import anthropic, ollama, openai, responses, webui
from serve.settings import Settings
from serve.state import Hub, hub_of
from tsjax.model import Model

log = logging.getLogger("tsjax.serve")


def load_model(s: Settings) -> Model:
    """The model as `s` asks for it (every process of a multi-process server loads alike)."""
    from tsjax.model import load

    return load(s.model, rows=s.rows, max_len=s.max_len, progress=False, mesh=s.mesh,
                quant=s.quant, mmproj=s.mmproj)  # fmt: skip


def _load(hub: Hub, channel: StepChannel | None) -> None:
    """Load the model and build the engine (blocking; runs in a worker thread). With several
    processes the engine drives the steps through `channel`, which replays each step on the
    followers."""
    s = hub.settings
    t0 = time.perf_counter()
    model = load_model(s)
    hub.load_seconds = time.perf_counter() - t0
    hub.model = model
    runner = model.runner() if channel is None else channel.attach(model.runner())
    hub.engine = Engine(
        model, decode_steps=s.decode_steps, prefill_chunk=s.prefill_chunk, runner=runner
    )


def _warm(hub: Hub) -> None:
    engine = hub.engine
    assert engine is not None
    if not engine.warm:
        hub.compile_seconds = engine.warmup()
    proj = engine.model.projector
    if proj is not None and hub.encoder is None:
        # compile only: running a full SigLIP image would cost ~a minute on a 2-core CPU
        secs = proj.warmup()
        hub.compile_seconds += secs
        log.info("projector %s compiled in %.1fs", proj.name, secs)
        hub.encoder = ImageEncoder(proj)
        hub.encoder.start()
    engine.start()
    hub.ready = True


def _startup_line(hub: Hub) -> str:
    m, s = hub.model, hub.settings
    assert m is not None
    devices = jax.devices()  # global: every process's devices
    where = f"{len(devices)}x {devices[0].platform} ({devices[0].device_kind})"
    if jax.process_count() > 1:
        where += f" in {jax.process_count()} processes"
    host = "localhost" if s.host in ("0.0.0.0", "::") else s.host
    return (
        f"tsjax serving {m.name} ({m.config.architecture}, {s.quant or 'float32'} weights,"
        f" {s.rows} rows x {m.max_len} ctx"
        f"{f', images via {m.projector.name}' if m.projector else ''})"
        f" on {where}: load {hub.load_seconds:.1f}s, compile {hub.compile_seconds:.1f}s"
        f" -> http://{host}:{s.port}"
    )


def _mesh_report(hub: Hub) -> list[str]:
    """The mesh, what is split over it, and each device's share and memory (after warm-up,
    so the cache and compiled steps are counted where the runtime reports memory)."""
    from tsjax.sharding import device_report, mesh_summary

    assert hub.model is not None and hub.engine is not None
    steps = hub.model.steps
    held = hub.engine.memory().per_device
    if steps.plan is None:
        return ["single device (no --mesh)", *device_report(None, held)[:1]]
    return [mesh_summary(steps.plan.mesh), *steps.plan.describe(), *device_report(steps.mesh, held)]


async def _bring_up(hub: Hub, channel: StepChannel | None) -> None:
    try:
        if hub.engine is None:
            await asyncio.to_thread(_load, hub, channel)
        await asyncio.to_thread(_warm, hub)
        log.info(_startup_line(hub))
        for line in _mesh_report(hub):
            log.info(line)
    except Exception as e:  # keep serving /health with the reason instead of dying silently
        log.exception("model failed to load")
        hub.error = f"model failed to load: {e}"


def _lifespan(hub: Hub, channel: StepChannel | None):
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        task = asyncio.create_task(_bring_up(hub, channel))
        try:
            yield
        finally:
            task.cancel()
            if hub.encoder is not None:
                hub.encoder.stop()
            if hub.engine is not None:
                hub.engine.stop()  # joins the loop thread: at most one dispatch
            if channel is not None:
                channel.close()  # followers exit once the engine has sent its last step
                # uvicorn re-raises SIGTERM after this, which ends the process before atexit
                # handlers run: leave the jax.distributed job now, with the followers.
                jax.distributed.shutdown()

    return lifespan


@get("/health", opt={access.ACCESS: access.PUBLIC})
async def health(request: Request) -> Response:
    hub = hub_of(request)
    if hub.ready:
        return Response({"status": "ok", "model": hub.model.name})  # type: ignore[union-attr]
    status = "error" if hub.error else "loading"
    return Response({"status": status, "error": hub.error or "loading model"}, status_code=503)


# The browser chat page (webui/index.html and its assets) at `/`. Routes registered by the API
# routers match first; only paths no handler claims fall through to these files. The page is
# public: with API keys set, it asks for one and sends it on every API call.
WEBUI_DIR = Path(__file__).resolve().parent.parent / "webui"
webui_files = create_static_files_router(
    path="/", directories=[WEBUI_DIR], html_mode=True, opt={access.ACCESS: access.PUBLIC}
)


# The files above answer GET and HEAD on every path; without this, any other method on a path
# no API claims would be a 405 (the files' route matched, its method did not). Same path
# parameter as the files' route, so Litestar joins the two into one route.
@route("/{file_path:path}", http_method=["POST", "PUT", "PATCH", "DELETE"],
       include_in_schema=False, opt={access.ACCESS: access.PUBLIC})  # fmt: skip
async def no_route(request: Request) -> None:
    raise ApiError(404, f"no endpoint {request.method} {request.url.path}")


def _render_api_error(request: Request, exc: ApiError) -> Response:
    """Errors no API router rendered (unknown paths, a missing key on /schema, the Responses
    router, which has no renderer of its own): in the shape of the API the path belongs to."""
    path = request.url.path
    if path.startswith("/v1/messages"):
        return anthropic.render_error(request, exc)
    if path.startswith("/v1/"):
        return openai.render_error(request, exc)
    return ollama.render_error(request, exc)  # {"error": "..."}: /api/* and the rest


def _render_not_found(request: Request, exc: NotFoundException) -> Response:
    """Litestar's 404 (no route, no such Web UI file) as JSON in the path's API shape."""
    return _render_api_error(request, ApiError(404, f"no endpoint {request.method} "
                                               f"{request.url.path}"))  # fmt: skip


def create_app(
    settings: Settings, engine: Engine | None = None, channel: StepChannel | None = None
) -> Litestar:
    """The app for `settings`. Pass an engine (already built, warm or not) to skip loading.
    `channel`: process 0 of a multi-process server (see `serve.engine.lockstep`)."""
    hub = Hub(settings)
    if engine is not None:
        hub.engine, hub.model = engine, engine.model
    app_metrics = metrics.Metrics(hub)
    key_guard = access.guard(settings)
    if key_guard is not None:
        log.info("API keys required (%d set) on every route but /health%s", len(settings.api_key),
                 "" if settings.metrics_auth else " and /metrics")  # fmt: skip
    return Litestar(
        route_handlers=[
            health,
            webui_files,
            no_route,
            ollama.router,
            openai.router,
            responses.router,
            anthropic.router,
            webui.router,
            metrics.router,
        ],
        state=State({"hub": hub, "metrics": app_metrics, **webui.state(settings)}),
        middleware=[app_metrics.middleware],
        lifespan=[_lifespan(hub, channel)],
        exception_handlers={ApiError: _render_api_error, NotFoundException: _render_not_found},
        guards=[key_guard] if key_guard else [],
        cors_config=access.cors(settings),
        request_max_body_size=settings.max_upload_bytes,
    )
