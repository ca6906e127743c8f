"""Decode-speed cost of constrained decoding: tok/s with and without a grammar, same run.

    python -m benchmarks.grammar [--model smollm2-135m] [--tokens 128] [--repeats 3] [--rows 1]

Runs the same prompt through the engine unconstrained, with `json_object`, and with a JSON
schema (fresh Constraint per request, as the server does), and reports decode tok/s for each
(completion tokens after the first / decode seconds, best of `--repeats`), plus the host-side
cost the engine pays per constrained token: xgrammar's bitmask fill and token accept, timed on
the tokens of a valid instance. With `--rows N` (N > 1) N requests decode together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "items": {
            "type": "array",
            "maxItems": 12,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "qty": {"type": "integer", "minimum": 0, "maximum": 99},
                    "fresh": {"type": "boolean"},
                },
                "required": ["name", "qty", "fresh"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "items"],
    "additionalProperties": False,
}

INSTANCE = {"title": "Groceries for the week", "items": [
    {"name": f"item number {i}", "qty": i, "fresh": i % 2 == 0} for i in range(12)]}  # fmt: skip

PROMPT = "Write a shopping list as JSON with a title and a dozen items (name, qty, fresh)."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", "-m", default=None, help="catalog name or .gguf path")
    p.add_argument("--tokens", type=int, default=128, help="max new tokens per request")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=int, default=1, help="requests decoding together")
    p.add_argument("--decode-steps", type=int, default=4)
    args = p.parse_args(argv)

    from serve.engine import Engine, EventKind, GenerationRequest
    from tsjax.grammar import GrammarFactory
    from tsjax.model import load
    from tsjax.sampling import SamplingParams

    model = load(args.model, rows=args.rows, max_len=512, progress=sys.stderr.isatty())
    engine = Engine(model, decode_steps=args.decode_steps, prefill_chunk=512)
    engine.warmup()
    engine.start()
    grammars = GrammarFactory(model.tokenizer, model.config.vocab_size)
    ids = model.render_chat([{"role": "user", "content": PROMPT}])

    def constraint(kind: str):
        if kind == "json_object":
            return grammars.json_object()
        if kind == "json_schema":
            return grammars.json_schema(SCHEMA, strict=True)
        return None

    async def one(kind: str, seed: int):
        sampling = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=seed)
        req = GenerationRequest(list(ids), sampling, args.tokens, reuse_prefix=False)
        req.constraint = constraint(kind)
        text, done = [], None
        async for ev in engine.generate(req):
            if ev.kind is EventKind.TOKEN:
                text.append(ev.text)
            elif ev.kind in (EventKind.DONE, EventKind.ERROR):
                done = ev
        return done, "".join(text)

    async def batch(kind: str, r: int):
        return await asyncio.gather(*(one(kind, 100 * r + i) for i in range(args.rows)))

    rows = []
    for kind in ("none", "json_object", "json_schema"):
        best, tokens, valid = 0.0, 0, 0
        for r in range(args.repeats):
            results = asyncio.run(batch(kind, r))
            for done, text in results:
                s = done.stats
                if s.completion_tokens > 1 and s.decode_seconds > 0:
                    rate = (s.completion_tokens - 1) / s.decode_seconds
                    best, tokens = max(best, rate), max(tokens, s.completion_tokens)
                try:
                    json.loads(text)
                    valid += 1
                except json.JSONDecodeError:
                    pass
        rows.append((kind, best, tokens, valid, args.repeats * args.rows))
    engine.stop()

    # Host cost per constrained token: fill the mask, then accept the token.
    import numpy as np

    from tsjax.grammar import mask_words

    c = grammars.json_schema(SCHEMA, strict=True)
    toks = model.tokenizer.encode(json.dumps(INSTANCE, separators=(", ", ": ")), add_bos=False)
    words = np.zeros((mask_words(c.vocab_size),), np.int32)
    t0 = time.perf_counter()
    n = 0
    for t in toks:
        c.fill(words)
        if not c.accept(t):
            break
        n += 1
    host_us = (time.perf_counter() - t0) / max(n, 1) * 1e6

    base = rows[0][1]
    print(f"model {model.name}, rows {args.rows}, max_tokens {args.tokens}, "
          f"best of {args.repeats}")  # fmt: skip
    print("| constraint | decode tok/s (per request) | vs none | tokens | valid JSON |")
    print("|---|---|---|---|---|")
    for kind, rate, tokens, valid, total in rows:
        ratio = f"{rate / base:.2f}x" if base else "-"
        print(f"| {kind} | {rate:.1f} | {ratio} | {tokens} | {valid}/{total} |")
    print(f"host mask fill + accept: {host_us:.0f} us/token over {n} tokens "
          f"(vocab {c.vocab_size})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
