"""The `tsjax` command: pull, list and generate here; other packages add theirs.

The library never imports the server or the benchmarks. `tsjax serve` and `tsjax bench` are
subcommands those packages register under the entry point group `tsjax.commands` (see
pyproject.toml): each entry point names a `Command`, found at startup with `importlib.metadata`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from tsjax.quants import QUANT_CHOICES, QUANT_HELP


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (prints only the text)")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", "-m", default=None, help="catalog name or path to a .gguf file")
    p.add_argument("--raw", action="store_true", help="tokenize the prompt as-is (no template)")
    p.add_argument("--system", default=None, help="system prompt (chat mode)")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="an image to show the model, before the prompt text (repeatable; needs --mmproj)",
    )
    p.add_argument(
        "--mmproj",
        default=None,
        help="multimodal projector GGUF (llama.cpp's mmproj file; a bare name is looked for"
        " beside the model)",
    )
    p.add_argument("--temperature", "-t", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=-1)
    p.add_argument("--max-tokens", "-n", type=int, default=256)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--max-len", type=int, default=None, help="cache length (context window)")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="auto", help=QUANT_HELP)
    p.add_argument("--stats", action="store_true", help="print timings to stderr")
    p.add_argument(
        "--mesh", default=None, help="shard over devices: tp=4, dp=2,tp=2, tp=-1 (all devices)"
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process JAX job first (jax.distributed.initialize; the cluster or"
        " JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID says where)",
    )
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    import jax

    from tsjax.generation import Generation, PromptTooLongError, stream
    from tsjax.model import load
    from tsjax.sampling import SamplingParams

    if args.distributed:
        from tsjax.sharding import initialize_distributed

        initialize_distributed()
    if jax.process_count() > 1 and args.seed < 0:
        # Every process must draw the same keys, or "replicated" sampler state disagrees.
        import numpy as np
        from jax.experimental import multihost_utils

        pick = np.int32(np.random.default_rng().integers(0, 2**31 - 1))
        args.seed = int(multihost_utils.broadcast_one_to_all(pick))
    # Every process runs the same program; only the first one prints.
    out = sys.stdout if jax.process_index() == 0 else open(os.devnull, "w")  # noqa: SIM115
    t0 = time.perf_counter()
    model = load(
        args.model,
        max_len=args.max_len,
        progress=sys.stderr.isatty(),
        mesh=args.mesh,
        quant=args.quant,
        mmproj=args.mmproj,
    )
    t_load = time.perf_counter() - t0
    if args.stats and model.steps.mesh is not None and jax.process_index() == 0:
        from tsjax.sharding import bytes_per_device, device_report, mesh_summary

        held = bytes_per_device(model.params)
        print(mesh_summary(model.steps.mesh), file=sys.stderr)
        print("\n".join(device_report(model.steps.mesh, held)), file=sys.stderr)
    if args.raw and args.image:
        print("error: --image needs the chat template (drop --raw)", file=sys.stderr)
        return 2
    if args.raw:
        ids = model.tokenizer.encode(args.prompt, parse_special=True)
    else:
        # images before the text, as Ollama and the reference server place them
        parts = [{"type": "image"} for _ in args.image] + [{"type": "text", "text": args.prompt}]
        messages = [{"role": "user", "content": parts if args.image else args.prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        ids = model.chat_prompt(messages, args.image) if args.image else model.render_chat(messages)
    sampling = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
    )
    res = Generation()
    t1 = time.perf_counter()
    try:
        for piece in stream(model, ids, sampling, args.max_tokens, args.stop, result=res):
            out.write(piece)
            out.flush()
    except PromptTooLongError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.write("\n")
    out.flush()
    if args.stats:
        first = time.perf_counter() - t1
        # Run the same request again: the compiled steps are cached now, so this is the
        # steady state; the difference to the first run is compilation.
        again = Generation()
        for _ in stream(model, ids, sampling, args.max_tokens, args.stop, result=again):
            pass
        steady = again.prefill_seconds + again.decode_seconds
        print(  # on every process: each ran the same steps, and stderr is per host
            f"model {model.name} ({model.config.architecture}) on {jax.default_backend()}"
            f" | load {t_load:.2f}s | first run {first:.2f}s (compile ~{first - steady:.2f}s)"
            f" | prefill {again.prompt_tokens} tok {again.prefill_tok_per_s:.1f} tok/s"
            f" | decode {len(again.tokens)} tok {again.decode_tok_per_s:.1f} tok/s"
            f" | finish {again.finish_reason}",
            file=sys.stderr,
        )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from tsjax.catalog import CATALOG, list_local

    local = dict(list_local())
    for name, entry in CATALOG.items():
        where = local.get(name)
        print(f"{name:16} {entry.architecture:8} {str(where) if where else '(not pulled)'}")
    return 0


COMMAND_GROUP = "tsjax.commands"


@dataclass(frozen=True)
class Command:
    """A `tsjax` subcommand from another package: its one-line help, a function that adds its
    flags to the subparser, and the function that runs it (returns the exit status)."""

    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _add_registered(sub) -> None:
    """The subcommands of the `tsjax.commands` entry points, in the order they are declared. One
    that fails to import still appears, and running it reports why instead of a bare "invalid
    choice" (the library's own commands keep working either way)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=COMMAND_GROUP):
        try:
            command = ep.load()
        except Exception as e:  # a broken optional dependency must not take down `tsjax pull`
            p = sub.add_parser(ep.name, help=f"(unavailable: {e})")
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=_unavailable(ep.name, ep.value, e))
            continue
        p = sub.add_parser(ep.name, help=command.help)
        command.add_args(p)
        p.set_defaults(func=command.run)


def _unavailable(name: str, target: str, error: Exception) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"error: tsjax {name} is unavailable: importing {target} failed: {error}",
              file=sys.stderr)  # fmt: skip
        return 2

    return run


def main(argv: list[str] | None = None) -> int:
    from tsjax.catalog import cmd_pull

    parser = argparse.ArgumentParser(prog="tsjax", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pull", help="fetch a catalog model and print its path")
    p.add_argument("name", nargs="*", help="model names (default: the default model)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("list", help="list catalog models and where they are")
    p.set_defaults(func=cmd_list)
    _add_generate(sub)
    _add_registered(sub)  # serve (serve/cli.py) and bench (benchmarks/engine.py)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (LookupError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
