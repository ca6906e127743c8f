"""Request-body validation on the hot path: msgspec (what serve/ uses) against pydantic v2.

    python -m benchmarks.validation [--rounds 7] [--number 2000]

Every request's body is decoded and type-checked before anything else runs, so this is the
per-request cost of the validation library. Both sides do the same work: bytes of an OpenAI
chat body -> a validated object, strictly (a string is not an integer), and then the messages
as the dicts the chat template reads. The msgspec side is serve/protocols/openai.py's own
`ChatBody`; the pydantic side mirrors its fields as models. Bodies: a typical chat turn (system
+ user, sampling fields, stream options) and a 100-message conversation with a tool list.

Rounds alternate msgspec and pydantic so that a slow spell of a shared machine hits both; the
report gives the median round of each (microseconds per body) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
]  # fmt: skip


def typical_body() -> bytes:
    """A chat turn as clients send it: system + user message and the usual options."""
    return json.dumps({
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {"role": "user", "content": "What is the capital of France, and why is it there?"},
        ],
        "temperature": 0.7, "top_p": 0.9, "max_tokens": 256, "stream": True,
        "stream_options": {"include_usage": True}, "seed": 7,
    }).encode()  # fmt: skip


def long_body(n: int = 100) -> bytes:
    """A long conversation: `n` alternating turns of ~200 characters, and a tool list."""
    turn = "Tell me more about the history of that city, its rivers and its bridges. " * 3
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(n - 1):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": turn[:200]})
    return json.dumps({"model": "m", "messages": msgs, "tools": TOOLS, "tool_choice": "auto",
                       "temperature": 0.2, "max_tokens": 512}).encode()  # fmt: skip


def msgspec_decoder() -> Callable[[bytes], list[dict[str, Any]]]:
    import msgspec

    from serve.protocols.openai import ChatBody

    decoder = msgspec.json.Decoder(ChatBody)

    def run(raw: bytes) -> list[dict[str, Any]]:
        body = decoder.decode(raw)
        return [msgspec.structs.asdict(m) for m in body.messages]

    return run


def pydantic_decoder() -> Callable[[bytes], list[dict[str, Any]]]:
    from pydantic import BaseModel, ConfigDict

    class Strict(BaseModel):
        model_config = ConfigDict(strict=True)

    class StreamOptions(Strict):
        include_usage: bool = False

    class ChatMessage(Strict):
        role: str
        content: str | list[dict[str, Any]] | None = None
        name: str | None = None
        tool_calls: list[dict[str, Any]] | None = None
        tool_call_id: str | None = None
        reasoning_content: str | None = None
        reasoning: str | None = None

    class ChatBody(Strict):
        model: str
        messages: list[ChatMessage]
        stream: bool = False
        stream_options: StreamOptions | None = None
        max_tokens: int | None = None
        max_completion_tokens: int | None = None
        temperature: float | None = None
        top_p: float | None = None
        top_k: int | None = None
        min_p: float | None = None
        repetition_penalty: float | None = None
        presence_penalty: float | None = None
        frequency_penalty: float | None = None
        seed: int | None = None
        n: int | None = None
        stop: str | list[str] | None = None
        tools: list[dict[str, Any]] | None = None
        tool_choice: str | dict[str, Any] | None = None
        parallel_tool_calls: bool | None = None
        response_format: dict[str, Any] | None = None
        think: bool | None = None
        reasoning_effort: str | None = None
        chat_template_kwargs: dict[str, Any] | None = None

    def run(raw: bytes) -> list[dict[str, Any]]:
        body = ChatBody.model_validate_json(raw)
        return [m.model_dump() for m in body.messages]

    return run


def _per_call_us(fn: Callable[[bytes], Any], raw: bytes, number: int) -> float:
    t = time.perf_counter()
    for _ in range(number):
        fn(raw)
    return (time.perf_counter() - t) / number * 1e6


def measure(rounds: int, number: int) -> list[tuple[str, int, float, float]]:
    """(body name, bytes, msgspec us, pydantic us): the median of alternating rounds."""
    sides = {"msgspec": msgspec_decoder(), "pydantic": pydantic_decoder()}
    out = []
    for name, raw in (("typical chat", typical_body()), ("100 messages", long_body())):
        a, b = sides["msgspec"](raw), sides["pydantic"](raw)
        assert a == b, "the two sides must produce the same messages"
        times: dict[str, list[float]] = {k: [] for k in sides}
        n = number if len(raw) < 4096 else max(1, number // 20)
        for _ in range(rounds):
            for side, fn in sides.items():
                times[side].append(_per_call_us(fn, raw, n))
        out.append((name, len(raw), statistics.median(times["msgspec"]),
                    statistics.median(times["pydantic"])))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.validation", description=__doc__)
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per side")
    p.add_argument("--number", type=int, default=2000, help="decodes per round (typical body)")
    args = p.parse_args(argv)
    import msgspec
    import pydantic

    print(f"msgspec {msgspec.__version__}, pydantic {pydantic.VERSION}; median of "
          f"{args.rounds} alternating rounds")  # fmt: skip
    print("| body | bytes | msgspec | pydantic | pydantic / msgspec |")
    print("|---|---|---|---|---|")
    for name, size, ms, pd in measure(args.rounds, args.number):
        print(f"| {name} | {size:,} | {ms:.1f} us | {pd:.1f} us | {pd / ms:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
