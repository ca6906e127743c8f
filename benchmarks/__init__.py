"""Benchmarks: scripts that time the library and the engine (`python -m benchmarks.<name>`).

`engine` is `tsjax bench` (prefill, decode, time to first token and cold start, against
llama.cpp on the same file); `decode`, `kernels` and `profile` time the compiled decode step and
the XLA:CPU kernel forms behind the CPU layout; `accuracy` measures how far bf16 and int8 weights
move the logits; `grammar` the cost of constrained decoding; `moe` the MoE layer's dispatch and
expert formats; `recurrent` the recurrent layers (Gated DeltaNet, Mamba2): chunked prefill
against token by token, and their decode step; `vision_encode` Gemma 3's image encoder;
`validation` request-body decoding (msgspec against pydantic); `event_loop` how a large request
holds up `/health` and grows the server's memory; `request_path` (not a timing) the modules one
chat request passes through. BENCHMARKS.md and the README quote their figures with the commands
that produced them.
Nothing in `tsjax` or `serve` imports this package.
"""
