"""The Web UI's model panel: `GET /api/models` (the hosted model, its architecture, the
backend and the load status) and `POST /api/models/load`, which succeeds only for the hosted
model: one model per process, compiled at startup.
"""

from __future__ import annotations

from typing import Any

import jax
import msgspec
from litestar import Request, Router, get, post
from litestar.params import JSONBody

from serve.bodies import StrictBody, required
from serve.errors import ApiError
from serve.protocols.webui.errors import render_ok_error
from serve.state import hub_of
from serve.translation.prompt import check_model


class LoadBody(msgspec.Struct):
    model: str | None = None
    backend: str | None = None
    mmproj: str | None = None


def _backend() -> str:
    return f"jax_{jax.default_backend()}"


_LABELS = {"cpu": "JAX CPU (XLA)", "gpu": "JAX GPU (XLA)", "tpu": "JAX TPU (XLA)"}


@get("/api/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The model panel: the one hosted model, its architecture and the backend it runs on."""
    hub = hub_of(request)
    m = hub.model
    proj = m.projector if m else None
    backend = _backend()
    return {
        "models": [m.name] if m else [],
        "mmProjModels": [proj.name] if proj else [],
        "loaded": m.name if m and hub.ready else None,
        "loadedMmProj": proj.name if proj and hub.ready else None,
        "loadedBackend": backend if hub.ready else None,
        "defaultBackend": backend,
        "supportedBackends": [
            {"value": backend, "label": _LABELS.get(jax.default_backend(), backend)}
        ],
        "architecture": m.config.architecture if m else None,
        "weightFormat": m.quant if m else None,  # tsjax.quants: "q4", "q8", "f32", ...
        "weightFormatReason": m.quant_reason if m else None,
        "hostedModelPath": str(m.path.resolve()) if m else None,
        "hostedMmProjPath": str(proj.path.resolve()) if proj else None,
        "defaultMaxTokens": m.max_len if m else hub.settings.max_len,
        "contextLength": m.max_len if m else None,
        "status": "ready" if hub.ready else ("error" if hub.error else "loading"),
        "error": hub.error or None,
    }


def _backend_ok(requested: str | None) -> bool:
    """Blank, our canonical name, or the bare/ggml platform name (`cpu`, `ggml_cuda`)."""
    name = (requested or "").strip().lower()
    if not name:
        return True
    for prefix in ("jax_", "ggml_"):
        name = name.removeprefix(prefix)
    name = {"cuda": "gpu", "metal": "gpu"}.get(name, name)
    return name == jax.default_backend()


@post("/api/models/load", status_code=200, dto=StrictBody[LoadBody], return_dto=None)
async def load_model(request: Request, data: JSONBody[LoadBody | None] = None) -> dict[str, Any]:
    """Only the hosted model can be "loaded": one model per process, compiled at startup. A
    matching request succeeds at once (weights on the device never change, so the reference's
    full reload would only cost time); anything else is a 400 that says how to switch."""
    hub, body = hub_of(request), required(data)
    if not (body.model or "").strip():
        raise ApiError(400, "model is required")
    if not _backend_ok(body.backend):
        raise ApiError(400, f"Backend '{body.backend}' is not supported on this machine.")
    model, _ = hub.live()
    try:
        check_model(body.model, model)  # type: ignore[arg-type]
    except ApiError as e:  # a model not hosted here is the reference's 400, not a 404
        raise ApiError(400, e.message, e.param) from e
    _check_mmproj(body.mmproj, model.projector)
    proj = model.projector
    return {"ok": True, "model": model.name, "loadedMmProj": proj.name if proj else None,
            "architecture": model.config.architecture, "reloaded": False}  # fmt: skip


def _check_mmproj(requested: str | None, proj) -> None:
    """The reference's three refusals; omitting mmproj is always fine. A projector is named
    by its file name or its path."""
    name = (requested or "").strip()
    if not name:
        return
    if name.lower() == "none":
        if proj is not None:
            raise ApiError(400, f"This server was started with mmproj '{proj.name}'. Restart"
                           " tsjax serve without --mmproj to host no projector.")  # fmt: skip
        return
    if proj is None:
        raise ApiError(400, "This server was started without --mmproj. Restart tsjax serve with"
                       " --mmproj <path.gguf> to host a projector.")  # fmt: skip
    if name not in (proj.name, str(proj.path), str(proj.path.resolve())):
        raise ApiError(400, f"mmproj '{name}' is not hosted by this server. Restart tsjax serve"
                       " with --mmproj <path.gguf> to change it.")  # fmt: skip


router = Router(
    path="/",
    route_handlers=[list_models, load_model],
    exception_handlers={ApiError: render_ok_error},
)
