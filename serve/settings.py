"""Server settings: one typed struct, filled from a TOML file, then `TSJAX_*` environment
variables, then CLI flags (each layer overrides the one before).

Settings are validated once here, at startup, so a typo in a deployment file fails loudly
instead of surfacing as a wrong default on the first request.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from tsjax.quants import QUANT_CHOICES, QUANT_HELP

DEFAULT_CONFIG = Path("configs/server.toml")
ENV_PREFIX = "TSJAX_"


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything `tsjax serve` can be told. Sampling fields are the server defaults a request
    starts from (the reference server's built-in defaults, not its docs)."""

    model: str | None = None  # catalog name or .gguf path; None = the catalog default
    # A multimodal projector (llama.cpp's mmproj GGUF) for image input: a bare file name is
    # looked for beside the model; None or "none" = text only.
    mmproj: str | None = None
    # Loopback only, as Ollama and llama.cpp: `--host 0.0.0.0` exposes the server (README,
    # "Security"). While bound to loopback, only requests naming a local host are served.
    host: str = "127.0.0.1"
    port: int = 5000
    # decode slots: requests decoded together in one batch; None = chosen from the model and
    # the machine at load (tsjax.capacity)
    rows: int | None = None
    max_len: int = 2048  # context window (KV cache length per slot)
    # weight format (tsjax.quants): "auto" chooses per platform and file, "f32" (or None) the
    # exact float weights, else "bf16", "int8", "q8" or "q4"
    quant: str | None = "auto"
    decode_steps: int = 4  # decode steps per dispatch when nobody is waiting
    prefill_chunk: int = 512
    max_tokens: int = 200  # default num_predict / max_tokens for the API surfaces
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1
    stop: list[str] = msgspec.field(default_factory=list)
    max_body_bytes: int = 16 * 1024 * 1024  # every JSON request body
    max_upload_bytes: int = 500 * 1024 * 1024  # one uploaded file (POST /api/upload)
    upload_quota_bytes: int = 2 * 1024 * 1024 * 1024  # every upload kept, together
    upload_ttl_s: float = 3600.0  # uploads no live session holds are deleted after this
    upload_dir: str | None = None  # None = a per-user folder under the temp directory
    # frames a video upload is shown as (serve/translation/video.py); 0 or less = 4, as the
    # reference
    video_max_frames: int = 4
    # Host names served besides localhost and loopback addresses while bound to loopback
    # (DNS rebinding defence); also checked on other binds when given. ["*"]: no check.
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    prepare_threads: int = 2  # worker threads that render and tokenize prompts
    shutdown_grace_s: float = 10.0  # on SIGTERM, running streams get this long to finish
    session_ttl_seconds: float = 3600.0  # Web UI sessions idle longer are dropped
    max_sessions: int = 256
    log_level: str = "INFO"
    # Access control (serve/access.py). API keys: when any is set, every route but /health (and
    # /metrics unless metrics_auth) needs `Authorization: Bearer KEY` or `x-api-key: KEY`.
    api_key: list[str] = msgspec.field(default_factory=list)
    metrics_auth: bool = False  # /metrics needs a key too (when keys are set)
    cors_origins: list[str] = msgspec.field(default_factory=list)  # browser origins; "*": any
    # Several devices: "tp=4", "dp=2,tp=2", "tp=-1" (every device); None = one device.
    mesh: str | None = None
    # Several processes (hosts): join a jax.distributed job before touching devices. With no
    # address, JAX finds the job from the cluster (TPU slice, SLURM, Open MPI) or from its own
    # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables.
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def validate(self) -> Settings:
        """Reject values that could only fail later, with the setting's name in the message."""
        checks = [
            ("port", 0 <= self.port < 65536),
            ("rows", self.rows is None or self.rows >= 1),
            ("max_len", self.max_len >= 16),
            ("decode_steps", self.decode_steps >= 1),
            ("prefill_chunk", self.prefill_chunk >= 1),
            ("max_tokens", self.max_tokens >= 1),
            ("max_body_bytes", self.max_body_bytes >= 1),
            ("max_upload_bytes", self.max_upload_bytes >= 1),
            ("upload_quota_bytes", self.upload_quota_bytes >= 1),
            ("upload_ttl_s", self.upload_ttl_s > 0),
            ("prepare_threads", self.prepare_threads >= 1),
            ("shutdown_grace_s", self.shutdown_grace_s >= 0),
            ("session_ttl_seconds", self.session_ttl_seconds > 0),
            ("max_sessions", self.max_sessions >= 1),
            ("quant", self.quant is None or self.quant in QUANT_CHOICES),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"invalid setting {name}={getattr(self, name)!r}")
        if any(not k.strip() or k != k.strip() for k in self.api_key):
            raise ValueError("invalid setting api_key: keys must be non-empty, without spaces "
                             "around them")  # fmt: skip
        if self.mesh:
            from tsjax.sharding import parse_mesh  # imports JAX: only when a mesh is asked for

            try:
                parse_mesh(self.mesh)
            except ValueError as e:
                raise ValueError(f"invalid setting mesh={self.mesh!r}: {e}") from e
        return self


FIELDS = Settings.__struct_fields__
# list settings: comma-separated in the environment
_LISTS = ("stop", "api_key", "cors_origins", "allowed_hosts")


def _from_file(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        data = tomllib.load(f)
    data = data.get("server", data)  # accept a [server] table or top-level keys
    for name in _LISTS:  # one value where a list is expected: `api_key = "k"`
        if isinstance(data.get(name), str):
            data[name] = [data[name]]
    unknown = set(data) - set(FIELDS)
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
    return data


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in FIELDS:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if name in _LISTS:  # a JSON list, or comma-separated
            out[name] = json.loads(raw) if raw.lstrip().startswith("[") else raw.split(",")
            if name != "stop":  # keys and origins never hold spaces; stop strings may
                out[name] = [v.strip() for v in out[name] if v.strip()]
        else:
            out[name] = raw
    return out


def load_settings(
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """File (explicit path, `TSJAX_CONFIG`, or configs/server.toml if present), then
    environment, then `overrides` (CLI flags; None values mean "not given")."""
    environ = dict(os.environ) if environ is None else environ
    merged: dict[str, Any] = {}
    path = config or environ.get(ENV_PREFIX + "CONFIG")
    if path is not None:
        merged.update(_from_file(Path(path)))
    elif DEFAULT_CONFIG.is_file():
        merged.update(_from_file(DEFAULT_CONFIG))
    try:
        base = msgspec.convert(merged, Settings)  # file values: strict types
        layered = msgspec.structs.asdict(base) | _from_env(environ)
        # environment strings like "8" or "0.7" convert to the field's type
        settings = msgspec.convert(layered, Settings, strict=False)
    except msgspec.ValidationError as e:
        raise ValueError(f"invalid settings: {e}") from e
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given:
        settings = msgspec.structs.replace(settings, **given)
    return settings.validate()


_FLAGS: list[tuple[str, type, str]] = [
    ("model", str, "catalog name or path to a .gguf file"),
    ("mmproj", str, "multimodal projector GGUF for images (a bare name: beside the model)"),
    ("host", str, "listen address (default 127.0.0.1; 0.0.0.0 = every interface)"),
    ("port", int, "listen port (default 5000)"),
    ("rows", int, "decode slots per batch (default: from KV per row, memory, cores)"),
    ("max_len", int, "context window in tokens (default 2048)"),
    ("quant", str, QUANT_HELP),
    ("decode_steps", int, "decode steps per dispatch (default 4)"),
    ("prefill_chunk", int, "prompt tokens per prefill call (default 512)"),
    ("max_tokens", int, "default max new tokens for API requests (default 200)"),
    ("temperature", float, "default sampling temperature (default 0.8)"),
    ("top_k", int, "default top-k (default 40, 0 = off)"),
    ("top_p", float, "default top-p (default 0.9)"),
    ("min_p", float, "default min-p (default 0.0)"),
    ("repeat_penalty", float, "default repetition penalty (default 1.1)"),
    ("repeat_last_n", int, "default penalty window (default 64)"),
    ("presence_penalty", float, "default presence penalty (default 0)"),
    ("frequency_penalty", float, "default frequency penalty (default 0)"),
    ("seed", int, "default seed (default -1 = random)"),
    ("max_body_bytes", int, "largest JSON request body (default 16 MiB)"),
    ("max_upload_bytes", int, "largest uploaded file (default 500 MiB)"),
    ("upload_quota_bytes", int, "all uploads kept together (default 2 GiB)"),
    ("upload_ttl_s", float, "unused uploads are deleted after this (default 3600)"),
    ("upload_dir", str, "where uploads are stored (default: a temp folder)"),
    ("video_max_frames", int, "frames kept of a video upload (default 4; 0 or less = 4)"),
    ("session_ttl_seconds", float, "idle Web UI sessions expire after this (default 3600)"),
    ("max_sessions", int, "most Web UI sessions kept at once (default 256)"),
    ("log_level", str, "logging level (default INFO)"),
    ("prepare_threads", int, "threads rendering and tokenizing prompts (default 2)"),
    ("shutdown_grace_s", float, "seconds running streams get on shutdown (default 10)"),
    ("mesh", str, "shard over devices: tp=4, dp=2,tp=2, tp=-1 = all (default: one device)"),
    ("coordinator_address", str, "jax.distributed coordinator host:port (implies --distributed)"),
    ("num_processes", int, "jax.distributed process count"),
    ("process_id", int, "jax.distributed index of this process"),
]


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `tsjax serve`. Every default is None so only flags actually given override
    the file and the environment."""
    parser.add_argument("--config", default=None, help=f"TOML settings file ({DEFAULT_CONFIG})")
    for name, typ, help_text in _FLAGS:
        flag = "--" + name.replace("_", "-")
        short = ["-m"] if name == "model" else []
        parser.add_argument(*short, flag, dest=name, type=typ, default=None, help=help_text)
    parser.add_argument(
        "--stop", action="append", default=None, help="default stop string (repeatable)"
    )
    parser.add_argument(
        "--api-key", dest="api_key", action="append", default=None,
        help="require this API key (Authorization: Bearer KEY or x-api-key: KEY); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--cors-origin", dest="cors_origins", action="append", default=None,
        help="allow browser requests from this origin (repeatable; * = any); default: none",
    )  # fmt: skip
    parser.add_argument(
        "--metrics-auth", dest="metrics_auth", action="store_true", default=None,
        help="with API keys set, /metrics needs a key too (default: open)",
    )  # fmt: skip
    parser.add_argument(
        "--allowed-host", dest="allowed_hosts", action="append", default=None,
        help="host name served besides localhost while bound to loopback (repeatable; * = any)",
    )  # fmt: skip
    parser.add_argument(
        "--distributed",
        action="store_true",
        default=None,
        help="join a multi-process JAX job (jax.distributed.initialize) before loading",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {name: getattr(args, name, None) for name, _, _ in _FLAGS}
    for name in ("stop", "api_key", "cors_origins", "metrics_auth", "allowed_hosts"):
        overrides[name] = getattr(args, name, None)
    overrides["distributed"] = getattr(args, "distributed", None)
    return load_settings(getattr(args, "config", None), overrides)
