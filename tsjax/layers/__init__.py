"""Shared building blocks. Shape letters (the whole repo uses them): B batch/slots, T query
tokens, S cache length, D model dim, N query heads, K kv heads, H head dim, F feed-forward dim,
V vocab, L layers."""
