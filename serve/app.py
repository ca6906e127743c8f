"""The Litestar application: routers for each API style, error rendering, and a lifespan that
owns the engine (load the model, compile, start; stop on shutdown).

Loading runs in the background so the listener is up at once: `/health` answers 503 until
the engine is warm, which is what load balancers and the tests poll for.

Every request passes `serve.requestlog` (its id, the log line of an error answer) and the
request guard (`serve.guard`: host, content type, upload credential, body limits). Every error,
the framework's own included (404, 405, 413, validation, an unexpected exception's 500), is
answered in the error shape of the API the path belongs to: the matched route's own renderer,
else by path (`/v1/messages` Anthropic, `/v1/` OpenAI, `/api/sessions` and `/api/models` the
Web UI's `{"ok": false}`, anything else `{"error": "..."}`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jax
import msgspec
from litestar import Litestar, Request, Response, get, route
from litestar.datastructures import State
from litestar.exceptions import HTTPException, MethodNotAllowedException, NotFoundException
from litestar.static_files import create_static_files_router

from serve import access, guard, metrics, requestlog
from serve.engine import Engine
from serve.engine.encoder import ImageEncoder
from serve.engine.lockstep import StepChannel
from serve.errors import ApiError
from serve.protocols import anthropic, ollama, openai, responses, webui
from serve.protocols.webui.errors import render_ok_error
from serve.settings import Settings
from serve.state import Hub, hub_of
from serve.uploads import UploadStore
from tsjax.capacity import (
    RowsChoice,
    choose_rows,
    cpu_cores,
    kv_bytes_per_row,
    memory_available,
)
from tsjax.model import Model
from tsjax.residency import peak_resident_bytes, release_free_memory, resident_bytes

log = logging.getLogger("tsjax.serve")


def load_model(s: Settings) -> Model:
    """The model as `s` asks for it (every process of a multi-process server loads alike)."""
    from tsjax.model import load

    rows = s.rows or default_rows(s).rows
    return load(s.model, rows=rows, max_len=s.max_len, progress=False, mesh=s.mesh,
                quant=s.quant, mmproj=s.mmproj)  # fmt: skip


def default_rows(s: Settings) -> RowsChoice:
    """The rows `s` gets: --rows, or from the model's KV cache per row, the memory free now
    and the cores (`tsjax.capacity`). Several processes (or devices) take a fixed 8: every
    process must choose alike, whatever its machine has free."""
    if s.rows:
        return RowsChoice(s.rows, "--rows")
    if s.mesh or s.distributed or s.coordinator_address:
        return RowsChoice(8, "fixed for a mesh or several processes (--rows overrides)")
    from tsjax.catalog import resolve_model
    from tsjax.gguf import GGUFFile
    from tsjax.model import default_dtype
    from tsjax.models import config_from_gguf

    cfg = config_from_gguf(GGUFFile(resolve_model(s.model)))
    kv_row = kv_bytes_per_row(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, s.max_len,
                              jax.numpy.dtype(default_dtype()).itemsize)  # fmt: skip
    if jax.default_backend() == "cpu":
        return choose_rows(kv_row, memory_available(), cpu_cores())
    stats = jax.devices()[0].memory_stats() or {}
    return choose_rows(kv_row, int(stats.get("bytes_limit", 0)), None)


def _load(hub: Hub, channel: StepChannel | None) -> None:
    """Load the model and build the engine (blocking; runs in a worker thread). With several
    processes the engine drives the steps through `channel`, which replays each step on the
    followers."""
    s = hub.settings
    t0 = time.perf_counter()
    hub.rows_choice = default_rows(s)
    model = load_model(msgspec.structs.replace(s, rows=hub.rows_choice.rows))
    hub.load_seconds = time.perf_counter() - t0
    hub.model = model
    # one process, one device: compile what the first requests need, the rest on first use
    # in the background (several processes must compile and pick the same shapes)
    model.steps.lazy = channel is None and model.steps.plan is None
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
    release_free_memory()  # what loading and compiling freed, held by the C allocator
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
    host = f"[{host}]" if ":" in host else host
    how = f" [rows {hub.rows_choice.reason}]" if hub.rows_choice else ""
    programs = len(m.steps.programs.keys())
    return (
        f"tsjax serving {m.name} ({m.config.architecture}, {_weights(m)},"
        f" {m.steps.shapes.rows} rows x {m.max_len} ctx"
        f"{f', images via {m.projector.name}' if m.projector else ''})"
        f" on {where}: load {hub.load_seconds:.1f}s, compile {hub.compile_seconds:.1f}s"
        f" ({programs} programs{', more on first use' if m.steps.lazy else ''}),"
        f" resident {resident_bytes() / 2**20:.0f} MiB (peak {peak_resident_bytes() / 2**20:.0f})"
        f" -> http://{host}:{s.port}{how}"
    )


def _weights(m: Model) -> str:
    """The weight format and, when the CPU kernels were built by this process, what that cost
    (a fresh machine builds them once; later starts find them in the cache)."""
    from tsjax.kernels import blockdot

    built = blockdot.build_seconds()
    return f"{m.quant} weights" + (
        f", kernels built in {built:.1f}s" if built and m.quant in ("q8", "q4") else ""
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


async def _in_daemon_thread(fn: Any, *args: Any) -> Any:
    """`fn(*args)` in a daemon thread: loading and compiling cannot be interrupted, and a
    server told to stop meanwhile should exit rather than wait for them (a worker of
    `asyncio.to_thread` would be joined at exit)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(error: BaseException | None, value: Any) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(value)

    def run() -> None:
        try:
            value, error = fn(*args), None
        except BaseException as e:  # handed to the awaiting coroutine
            value, error = None, e
        try:
            loop.call_soon_threadsafe(settle, error, value)
        except RuntimeError:  # the loop is gone: the server stopped meanwhile
            pass

    threading.Thread(target=run, name="tsjax-load", daemon=True).start()
    return await done


async def _bring_up(hub: Hub, channel: StepChannel | None) -> None:
    try:
        if hub.engine is None:
            await _in_daemon_thread(_load, hub, channel)
        await _in_daemon_thread(_warm, hub)
        log.info(_startup_line(hub))
        for line in _mesh_report(hub):
            log.info(line)
        s = hub.settings
        if not guard.is_loopback(s.host) and not s.api_key:
            log.warning("listening on %s with no API key: anyone who can reach port %d can "
                        "use the model (README, \"Security\")", s.host, s.port)  # fmt: skip
    except Exception as e:  # keep serving /health with the reason instead of dying silently
        log.exception("model failed to load")
        hub.error = f"model failed to load: {e}"


async def _sweep_uploads(store: UploadStore) -> None:
    """Delete expired uploads now and then every few minutes (a quarter of the TTL, at most
    five minutes), for as long as the app runs."""
    interval = min(max(store.ttl / 4, 1.0), 300.0)
    while True:
        try:
            removed = await asyncio.to_thread(store.sweep)
            if removed:
                log.info("deleted %d expired upload(s) from %s", removed, store.root)
        except OSError:
            log.exception("sweeping the upload directory failed")
        await asyncio.sleep(interval)


def _lifespan(hub: Hub, channel: StepChannel | None):
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        task = asyncio.create_task(_bring_up(hub, channel))
        sweeper = asyncio.create_task(_sweep_uploads(app.state.uploads))
        try:
            yield
        finally:
            task.cancel()
            if hub.encoder is not None:
                hub.encoder.stop()
            sweeper.cancel()
            hub.close()
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


_BY_PREFIX = [
    ("/v1/messages", anthropic.render_error),
    ("/v1/", openai.render_error),
    ("/api/sessions", render_ok_error),
    ("/api/models", render_ok_error),
]


def _renderer(request: Request) -> Any:
    """The ApiError renderer of the request's route, else of the API its path belongs to
    (unknown paths, a missing key on /schema, the Responses router, which has none)."""
    handler = request.scope.get("route_handler")
    if handler is not None:
        found = handler.resolve_exception_handlers().get(ApiError)
        if found is not None and found is not render_error:
            return found
    path = request.scope.get("path", "")
    return next((r for prefix, r in _BY_PREFIX if path.startswith(prefix)), ollama.render_error)


def as_api_error(request: Request, exc: Exception) -> ApiError:
    """Any exception as the ApiError to answer with. Unexpected ones are logged with their
    traceback and answered 500 with the request id (the log has the details)."""
    if isinstance(exc, ApiError):
        return exc
    method, path = request.scope.get("method", ""), request.scope.get("path", "")
    if isinstance(exc, NotFoundException):  # no route, no such Web UI file
        return ApiError(404, f"no endpoint {method} {path}")
    if isinstance(exc, MethodNotAllowedException):
        return ApiError(405, f"{method} is not allowed on {path}")
    if isinstance(exc, HTTPException):
        extra = f" ({exc.extra})" if getattr(exc, "extra", None) else ""
        return ApiError(exc.status_code, f"{exc.detail}{extra}")
    rid = requestlog.REQUEST_ID.get()
    log.error("request_id=%s %s %s failed", rid, method, path, exc_info=exc)
    if isinstance(exc, RecursionError):  # a nested input no check caught: the input's fault
        return ApiError(400, "the request is nested too deeply to process")
    return ApiError(500, f"internal server error (request id {rid}; the server log has it)")


def render_error(request: Request, exc: Exception) -> Response:
    """Every error the routes do not render themselves (the framework's, unexpected ones),
    in the shape of the API the request was for."""
    return _renderer(request)(request, as_api_error(request, exc))


async def _reject(scope: Any, receive: Any, send: Any, err: ApiError) -> None:
    """Answer a request the guard refused, in its route's error shape."""
    request: Request = Request(scope, receive, send)
    response = _renderer(request)(request, err)
    await response.to_asgi_response(app=None, request=request)(scope, receive, send)


class App(Litestar):
    """Litestar, with every HTTP request given an id and its error answers logged."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        await requestlog.serve(super().__call__, scope, receive, send)


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
    # the guard enforces the precise limits; Litestar's own only backs it up
    backstop = max(settings.max_body_bytes, settings.max_upload_bytes) + 2 * guard.UPLOAD_OVERHEAD
    return App(
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
        middleware=[app_metrics.middleware, guard.middleware(settings, _reject)],
        lifespan=[_lifespan(hub, channel)],
        exception_handlers=dict.fromkeys([ApiError, HTTPException, Exception], render_error),
        guards=[key_guard] if key_guard else [],
        cors_config=access.cors(settings),
        request_max_body_size=backstop,
        logging_config=None,  # logging is the process's (tsjax serve: request ids in the format)
    )
