"""`tsjax serve` (and `python -m serve`): load the model, compile, and serve HTTP until
interrupted. Registered with the `tsjax` command through the `tsjax.commands` entry point; the
flags and the settings they fill are serve/settings.py's, the app is serve/app.py's.
"""

from __future__ import annotations

import argparse
import logging

from serve.settings import Settings, add_serve_args, settings_from_args
from tsjax.cli import Command

log = logging.getLogger("tsjax.serve")


def cmd_serve(args: argparse.Namespace) -> int:
    """`tsjax serve`: load the model, compile, and serve HTTP until interrupted. In a
    multi-process job process 0 serves and every other process follows its steps."""
    import uvicorn

    from serve.app import create_app

    settings = settings_from_args(args)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
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
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
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
