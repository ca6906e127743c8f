"""`tsjax serve` (and `python -m serve`): load the model, compile, and serve HTTP until
interrupted. Registered with the `tsjax` command through the `tsjax.commands` entry point; the
flags and the settings they fill are serve/settings.py's, the app is serve/app.py's.

Shutdown (SIGTERM or SIGINT): the listener closes at once and idle connections with it; running
requests get `shutdown_grace_s` to finish, then the engine stops, which ends each of them with
its API's error frame (OpenAI: an `error` event, then `[DONE]`; Ollama: a last line with
`done_reason: "error"`; Web UI: `done` with `error`; a request not yet streaming: a 503), and
the process exits. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from serve.settings import Settings, add_serve_args, settings_from_args
from tsjax.cli import Command

log = logging.getLogger("tsjax.serve")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def graceful_server(config: Any, hub: Any) -> Any:
    """A uvicorn server whose shutdown ends running streams after the hub's grace period, and
    which a second signal stops at once."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:  # the second signal: do not wait for anything
                log.warning("second signal: exiting now")
                os._exit(128 + sig)
            log.info("shutting down: running requests get %.0f s", hub.settings.shutdown_grace_s)
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: Any = None) -> None:
            hub.draining = True
            loop = asyncio.get_running_loop()
            ending = loop.call_later(hub.settings.shutdown_grace_s, _end_streams, hub)
            try:
                await super().shutdown(sockets)
            finally:
                ending.cancel()

    return Server(config)


def _end_streams(hub: Any) -> None:
    """The grace period is over: stop the engine (in a thread: it joins the loop thread),
    which fails every running and queued request with "server shutting down"."""
    if hub.engine is not None:
        log.warning("grace period over: ending the requests still running")
        asyncio.get_running_loop().run_in_executor(None, hub.engine.stop)


def cmd_serve(args: argparse.Namespace) -> int:
    """`tsjax serve`: load the model, compile, and serve HTTP until interrupted. In a
    multi-process job process 0 serves and every other process follows its steps."""
    import uvicorn

    from serve.app import create_app
    from serve.requestlog import install_log_ids

    settings = settings_from_args(args)
    install_log_ids()
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT, force=True)
    channel = None
    if settings.distributed or settings.coordinator_address:
        from tsjax.sharding import initialize_distributed

        if initialize_distributed(
            settings.coordinator_address, settings.num_processes, settings.process_id
        ):
            import jax

            if not settings.mesh:
                raise ValueError(
                    "several processes serve one model over a mesh of all their devices:"
                    " give --mesh (e.g. --mesh tp=-1)"
                )
            if jax.process_index() != 0:
                return _follow(settings)
            from serve.engine.lockstep import StepChannel

            channel = StepChannel()
    app = create_app(settings, channel=channel)
    # uvicorn's own bound on the wait: a few seconds past the grace, for streams that do not
    # end when the engine stops (a client that stopped reading)
    wait = int(settings.shutdown_grace_s) + 5
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=wait)  # fmt: skip
    try:
        graceful_server(config, app.state.hub).run()
    finally:
        if channel is not None:
            channel.close()  # no-op if the app's shutdown already released the followers
    return 0


def _follow(settings: Settings) -> int:
    """A follower process: no HTTP; load the model and run process 0's steps in lockstep."""
    import jax

    from serve.app import load_model
    from serve.engine.lockstep import announce_ready, follow
    from tsjax.sharding import mesh_summary

    me, n = jax.process_index(), jax.process_count()
    log.info("follower %d of %d: no HTTP here; process 0 serves and drives the steps", me, n)
    try:
        model = load_model(settings)
    except Exception as e:
        log.exception("follower %d: model failed to load", me)
        announce_ready(f"model failed to load: {e}")
        return 1
    announce_ready()
    assert model.steps.mesh is not None
    log.info("follower %d: %s loaded; %s", me, model.name, mesh_summary(model.steps.mesh))
    code = follow(model.runner())
    if code == 0:
        jax.distributed.shutdown()  # with process 0, which leaves once it has sent SHUTDOWN
    return code


command = Command(help="serve the Ollama/OpenAI HTTP API", add_args=add_serve_args, run=cmd_serve)
