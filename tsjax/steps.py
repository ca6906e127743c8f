"""The compiled steps: `prefill` writes prompt tokens into cache rows and returns the logits
of each row's last token; `decode` advances every row by one token.

Params and the cache are arguments (the cache is donated, so XLA updates it in place). Only
shapes are static: the batch and token buckets of prefill, and `attn_len`, the bucket of
cache positions attention reads. Everything else a request can vary is array data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tsjax.cache import Cache, KVLayout
from tsjax.grammar import mask_words
from tsjax.logprobs import Logprobs, of, of_positions
from tsjax.models import Decoder, ModelConfig
from tsjax.models.decoder import unroll_layers_default
from tsjax.sampling import SamplerState, SamplingParams, host_sampler_state, sample
from tsjax.shapes import StepShapes, bucket_for, steps_bucket
from tsjax.sharding import DEFAULT_RULES, ShardingPlan, constrain_inputs, put, put_tree
from tsjax.spans import EmbedSpan, SpanInputs, span_inputs


def _flags(flags: list[bool] | None, b: int) -> np.ndarray:
    """[b] bool: `flags` then False for the padding rows."""
    out = np.zeros((b,), bool)
    if flags is not None:
        out[: len(flags)] = flags
    return out


def _slots(slots: list[int] | None, b: int) -> np.ndarray:
    """[b] int32 checkpoint slots: `slots` then -1 (none) for the padding rows."""
    out = np.full((b,), -1, np.int32)
    if slots is not None:
        out[: len(slots)] = slots
    return out


def fit_rows(x: jax.Array, n: int) -> jax.Array:
    """x's first n rows, zero rows appended if it has fewer (decode batches may pad past the
    cache's rows)."""
    if x.shape[0] >= n:
        return x[:n]
    return jnp.pad(x, [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


@dataclass
class PendingTokens:
    """The tokens of a decode dispatch (or a prefill's first tokens, one step) that may still
    be running: `get()` waits for them and returns [n_steps, rows] numpy (the dispatch's rows
    in the order they were given). `next` holds, on the device, what the next step would be
    fed: a decode given this object as its tokens continues from there without the tokens
    leaving the device. The step's other outputs stay on the device until asked for: the
    log-probabilities of the tokens (rows that asked; `tsjax.logprobs`) and, from a prefill,
    each row's sum of final-normed states over its tokens (`pooled`, for embeddings) and its
    prompt positions' log-probabilities (`prompt`, rows that asked)."""

    out: jax.Array  # [max_steps, b]
    n_steps: int
    where: np.ndarray  # [rows] the dispatch's rows
    next: jax.Array  # [b] each row's last sampled token
    logprobs: Logprobs | None = None  # [max_steps, b] chosen, [max_steps, b, TOP] top
    pooled: jax.Array | None = None  # [b, D] prefill only
    prompt: Logprobs | None = None  # [b, T] (+ [TOP]) prefill only
    # [b] rows that sampled a stop token: the next decode steps leave them be (None: none)
    halted: jax.Array | None = None

    def get(self) -> np.ndarray:
        return np.asarray(self.out)[: self.n_steps, self.where]

    def token_logprobs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sampled tokens' (chosen [n_steps, rows], top ids and top log-probabilities
        [n_steps, rows, TOP]); zeros for rows that did not ask."""
        assert self.logprobs is not None
        return tuple(np.asarray(a)[: self.n_steps, self.where] for a in _fields(self.logprobs))

    def pooled_sums(self) -> np.ndarray:
        """[rows, D] float32: each prefilled row's final-normed states summed over its tokens."""
        assert self.pooled is not None
        return np.asarray(self.pooled)[self.where]

    def prompt_logprobs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per prefilled position t of each row: the log-probability of the token after it
        (chosen [rows, T]) and the best tokens there ([rows, T, TOP] ids and values)."""
        assert self.prompt is not None
        return tuple(np.asarray(a)[self.where] for a in _fields(self.prompt))


def _fields(lp: Logprobs) -> tuple[jax.Array, jax.Array, jax.Array]:
    return lp.chosen, lp.top_ids, lp.top


class Steps:
    """Compiled steps for one model config and one set of shapes.

    With a `mesh`, the steps are SPMD programs over it: params, cache and sampler state carry
    the shardings of `tsjax.sharding.ShardingPlan`, and every step names its in/out shardings,
    so a donated cache comes back with the layout it went in with and XLA reuses its buffers
    in place. Without one, nothing here differs from a plain single-device jit.

    `stop_ids`: the tokens that end generation (the tokenizer's end-of-generation ids). A row
    that samples one inside a multi-step decode dispatch stops advancing for the rest of it
    (and for a dispatch that continues from it on the device): its cache then holds exactly
    the answer, which a state that cannot rewind (a recurrent layer's) needs to be resumed
    from by the next turn."""

    def __init__(
        self,
        cfg: ModelConfig,
        shapes: StepShapes,
        dtype=jnp.float32,
        mesh: Mesh | None = None,
        rules: dict[str, str | None] | None = None,
        unrolled: bool | None = None,
        quant: str | None = None,
        stop_ids: tuple[int, ...] = (),
    ):
        self.cfg = cfg
        self.stop_ids = np.asarray(sorted(stop_ids), np.int32)
        # XLA:CPU's narrow matmuls are slow for one row: pad their decode there
        self.shapes = shapes = shapes.padded_decode(quant, jax.default_backend() == "cpu")
        self.dtype = dtype
        # Params layout (see `unroll_layers_default`); load_params must be given the same.
        self.unrolled = unroll_layers_default() if unrolled is None else unrolled
        self.model = Decoder(cfg, dtype, self.unrolled, quant)
        # Attention's cache layout (see tsjax.cache): blocked where the layer loop is unrolled
        # (CPU), stacked where it is scanned.
        self.layout = KVLayout(checkpoints=shapes.checkpoints)
        if self.unrolled:
            self.layout = KVLayout(
                shapes.cache_blocks(), shapes.skip_min_rows, checkpoints=shapes.checkpoints
            )
        self.mesh = mesh
        self.plan = None
        if mesh is not None:
            self.plan = ShardingPlan(
                mesh, cfg, shapes.rows, shapes.max_len, dict(rules or DEFAULT_RULES)
            )
        prefill, decode, forward = self._prefill, self._decode, self._forward
        sh: dict[str, dict] = {
            k: {} for k in ("prefill", "decode", "forward", "cache", "swap", "copy")
        }
        if self.plan is not None:
            sh, (prefill, decode, forward) = self._sharded(prefill, decode, forward)
        self.prefill_fn = jax.jit(
            prefill, static_argnames=("attn_len",), donate_argnums=(1, 2), **sh["prefill"]
        )
        self.decode_fn = jax.jit(
            decode,
            static_argnames=("attn_len", "max_steps"),
            donate_argnums=(1, 2),
            **sh["decode"],
        )
        self.forward_fn = jax.jit(forward, static_argnames=("attn_len",), **sh["forward"])
        self._create_cache = jax.jit(self._zero_cache, **sh["cache"])
        self.swap_fn = jax.jit(self._swap, donate_argnums=(0, 1), **sh["swap"])
        self.copy_fn = jax.jit(self._copy, donate_argnums=(0, 1), **sh["copy"])

    def _sharded(self, *fns):
        """Pin the layouts of a mesh run: inputs (params, cache[, sampler]) are constrained to
        the plan's shardings inside each step and outputs are declared with `out_shardings`,
        so the donated cache and sampler come back exactly as they went in and XLA updates
        them in place. (jit's `in_shardings` would do the same for the inputs but refuses
        keyword-only static arguments such as `attn_len`.) Host inputs arrive replicated."""
        from tsjax.loader import param_shapes

        assert self.plan is not None
        p = self.plan.params(param_shapes(self.model))
        c = self.plan.cache(jax.eval_shape(self._zero_cache))
        s, r = self.plan.sampler(), self.plan.replicated()
        jit_kw = {
            # first tokens, logits, cache, sampler, (logprobs, pooled states, prompt logprobs)
            "prefill": dict(out_shardings=(r, r, c, s, r)),
            # tokens, next, halted, logits, logprobs, cache, sampler
            "decode": dict(out_shardings=(r, r, r, r, r, c, s)),
            "forward": dict(out_shardings=r),
            "cache": dict(out_shardings=c),
            "swap": dict(in_shardings=(c, s, r, r), out_shardings=(c, s)),
            "copy": dict(in_shardings=(c, s, r, r, r, r), out_shardings=(c, s)),
        }
        pinned = [(p, c, s), (p, c, s), (p, c)]
        return jit_kw, [constrain_inputs(f, ss) for f, ss in zip(fns, pinned, strict=True)]

    def _put(self, x) -> jax.Array:
        """Host data for a step: replicated over the mesh (a global array, as multi-process
        jit requires), or the default device."""
        return jnp.asarray(x) if self.plan is None else put(np.asarray(x), self.plan.replicated())

    @property
    def blocks(self):
        """(row bounds, position bounds) of the blocked cache layout, or None (stacked)."""
        return self.layout.blocks

    def _zero_cache(self) -> Cache:
        return self.model.new_cache(self.shapes.rows, self.shapes.max_len, self.layout)

    def new_cache(self) -> Cache:
        """A zeroed cache, created directly in its shards (never whole on one device)."""
        if self.plan is None:
            return self._zero_cache()
        return self._create_cache()

    def new_sampler(self) -> SamplerState:
        state = SamplerState.create(self.shapes.rows)
        return state if self.plan is None else put_tree(state, self.plan.sampler())

    # -- pure step bodies ---------------------------------------------------------------

    def _prefill(
        self,
        params,
        cache: Cache,
        sampler: SamplerState,
        new_sampler: SamplerState,
        tokens,
        rows,
        starts,
        lengths,
        masks,
        restore,
        checkpoint,
        targets,
        scored,
        spans: SpanInputs | None = None,
        *,
        attn_len: int,
    ):
        """tokens, targets: [b, T]; rows, starts, lengths, restore, checkpoint, scored: [b].
        Row r's tokens go to positions starts[r] .. starts[r] + lengths[r] - 1 of cache row
        rows[r] (rows >= B are padding), and `new_sampler` (b rows) replaces those rows'
        sampling state. A row first resumes from its checkpoint slot restore[r] and saves its
        state into slot checkpoint[r] after (-1: neither; `tsjax.cache.LayerState`: states
        that rewind by length alone ignore both). `spans`: embeddings in place of some tokens
        (`tsjax.spans`; None, the text path, compiles apart). Samples each row's first token.
        Returns (tokens [b], logits [b, V], cache, sampler, (the first tokens'
        log-probabilities (rows whose sampler state asks), each row's final-normed states
        summed over its tokens [b, D], and for `scored` rows each position's log-probability
        of `targets`, the token after it))."""
        b, t = tokens.shape
        positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        counts = jnp.where(rows < cache.lengths.shape[0], lengths, 0)
        logits, cache, hidden = self.model.apply(
            {"params": params},
            tokens,
            positions,
            cache.restore(rows, restore),
            rows,
            jnp.maximum(lengths - 1, 0),
            attn_len,
            counts,
            spans,
            hidden=True,
        )
        cache = cache.checkpoint(rows, checkpoint)
        new_lengths = cache.lengths.at[rows].set(starts + lengths, mode="drop")
        first, sampled = sample(logits, new_sampler, masks)
        sampler = jax.tree.map(lambda a, n: a.at[rows].set(n, mode="drop"), sampler, sampled)
        real = jnp.arange(t)[None, :] < counts[:, None]
        pooled = jnp.sum(jnp.where(real[..., None], hidden.astype(jnp.float32), 0), axis=1)
        lp = jax.lax.cond(
            jnp.any(new_sampler.logprobs),
            lambda: of(logits, first),
            lambda: Logprobs.zeros((b,)),
        )
        prompt = jax.lax.cond(
            jnp.any(scored),
            lambda: of_positions(lambda x: self.model.project(params, x), hidden, targets),
            lambda: Logprobs.zeros((b, t)),
        )
        return first, logits, replace(cache, lengths=new_lengths), sampler, (lp, pooled, prompt)

    def _decode_logits(self, params, cache: Cache, tokens, active, attn_len: int):
        """One token for each of the cache rows [0, b). tokens, active: [b]. Positions are
        the row lengths; inactive rows compute but neither advance nor disturb their cached
        state."""
        b = tokens.shape[0]
        lengths = fit_rows(cache.lengths, b)
        counts = active.astype(jnp.int32)
        logits, cache = self.model.apply(
            {"params": params},
            tokens[:, None],
            lengths[:, None],
            cache,
            None,
            jnp.zeros_like(tokens),
            attn_len,
            counts,
        )
        new_lengths = cache.lengths + fit_rows(counts, cache.lengths.shape[0])
        return logits, replace(cache, lengths=new_lengths)

    def _decode(
        self,
        params,
        cache: Cache,
        sampler: SamplerState,
        tokens,
        active,
        halted,
        masks,
        n_steps,
        *,
        attn_len: int,
        max_steps: int,
    ):
        """`n_steps` (a traced scalar, at most `max_steps`) decode steps for the cache rows
        [0, b) in one dispatch. tokens, active, halted: [b]. Decoding only a bucket of rows
        keeps one stream from paying for a full batch (the engine keeps live requests in the
        lowest rows, see `swap_rows`); the step count being data, one compiled program
        serves 1 step (someone is waiting) and several. A row that is halted, or samples a
        stop token (`stop_ids`), idles for the rest of the dispatch. Returns (tokens
        [max_steps, b], the first n_steps rows filled; the tokens the next step would be fed
        [b]; halted [b]; logits of the last step [b, V]; log-probabilities; cache, sampler)."""
        b = tokens.shape[0]
        sub = jax.tree.map(lambda a: fit_rows(a, b), sampler)
        report = jnp.any(sub.logprobs & active)  # some row asks for log-probabilities
        stops = jnp.asarray(self.stop_ids)

        def step(i, carry):
            cache, sub, tokens, halted, _, out, lps = carry
            going = active & ~halted
            logits, cache = self._decode_logits(params, cache, tokens, going, attn_len)
            tokens, sub = sample(logits, sub, masks)
            halted = halted | (going & jnp.isin(tokens, stops))
            lps = jax.lax.cond(report, lambda: lps.at_set(i, of(logits, tokens)), lambda: lps)
            # carried as [V, b], the output projection's own layout: no copy per step
            return cache, sub, tokens, halted, logits.T, out.at[i].set(tokens), lps

        init_logits = jnp.zeros((self.cfg.vocab_size, b), jnp.float32)
        out = jnp.zeros((max_steps, b), jnp.int32)
        lps = Logprobs.zeros((max_steps, b))
        cache, sub, tokens, halted, logits_t, out, lps = jax.lax.fori_loop(
            0, n_steps, step, (cache, sub, tokens, halted, init_logits, out, lps)
        )
        logits = logits_t.T
        sampler = jax.tree.map(lambda a, n: a.at[:b].set(n[: a.shape[0]]), sampler, sub)
        return out, tokens, halted, logits, lps, cache, sampler

    def _swap(self, cache: Cache, sampler: SamplerState, a, b):
        """Exchange cache rows a[i] <-> b[i] (every layer's state, lengths, sampling state).
        Indices >= B are padding: they read a clipped row and write nothing."""
        src = jnp.concatenate([a, b])
        dst = jnp.concatenate([b, a])

        def move(x):  # any array with the row axis first
            return x.at[dst].set(jnp.take(x, src, axis=0, mode="clip"), mode="drop")

        return cache.swap(src, dst), jax.tree.map(move, sampler)

    def _copy(self, cache: Cache, sampler: SamplerState, new_sampler, src, dst, lengths):
        """Row dst[i] takes a copy of row src[i]'s state (every layer's; src rows keep theirs)
        and holds lengths[i] tokens of it (its first ones: a shorter length rewinds), and
        `new_sampler`'s row i as its sampling state. Indices dst >= B are padding."""
        cache = cache.swap(src, dst)
        cache = replace(cache, lengths=cache.lengths.at[dst].set(lengths, mode="drop"))
        return cache, jax.tree.map(lambda a, n: a.at[dst].set(n, mode="drop"), sampler, new_sampler)

    def _forward(self, params, cache: Cache, tokens, starts, *, attn_len: int):
        """All-position logits without keeping the cache: for tests and scoring."""

    def _forward(self, params, cache: Cache, tokens, starts, spans=None, *, attn_len: int):
        """All-position logits without keeping the cache: for tests and scoring (`spans`:
        `tsjax.spans.SpanInputs` or None)."""
        t = tokens.shape[1]
        positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        logits, _ = self.model.apply(
            {"params": params},
            tokens,
            positions,
            cache,
            jnp.arange(tokens.shape[0], dtype=jnp.int32),
            None,
            attn_len,
            None,
            spans,
        )
        return logits

    # -- host-side entry points -----------------------------------------------------------

    def compiled_count(self) -> int:
        """How many shapes the steps have compiled so far (tests assert it stays put)."""
        fns = (self.prefill_fn, self.decode_fn, self.swap_fn, self.copy_fn)
        return sum(f._cache_size() for f in fns)

    def warmup(
        self,
        params,
        decode_steps: tuple[int, ...] = (1,),
        max_prompt: int | None = None,
        batches: tuple[int, ...] = (1,),
        span_lens: tuple[int, ...] = (),
    ) -> float:
        """Compile prefill for each token bucket (fresh prompts, `batches` batch buckets),
        the prefill with embedded spans for the buckets of `span_lens` (prompt lengths; one
        row), and decode for each attention bucket and each `decode_steps` count. Returns
        seconds."""
        t0 = time.perf_counter()
        cache, sampler = self.new_cache(), self.new_sampler()
        greedy = SamplingParams.greedy()
        top = max_prompt or self.shapes.max_len
        for b in batches:
            for t in self.shapes.prefill_lens:
                if t > top:
                    break
                n = min(t, self.shapes.max_len - 1)
                _, _, cache, sampler = self.prefill(
                    params, cache, sampler, [[0] * n] * b, list(range(b)), [greedy] * b
                )
        span_buckets = {bucket_for(n, self.shapes.prefill_lens) for n in span_lens}
        for t in sorted(span_buckets):
            n = min(t, self.shapes.max_len - 1)
            dummy = EmbedSpan(0, np.zeros((1, self.cfg.dim), np.float32), "0", True)
            _, _, cache, sampler = self.prefill(
                params, cache, sampler, [[0] * n], [0], [greedy], spans=[[dummy]]
            )
        # one compiled program per step-count bucket: run each with its largest count
        counts = {steps_bucket(n): n for n in sorted(decode_steps)}.values()
        for b in self.shapes.decode_batches:
            for attn_len in self.shapes.attn_lens:
                for n in counts:
                    pos = max(min(attn_len, self.shapes.max_len) - n, 0)
                    _, _, cache, sampler = self.decode(
                        params, cache, sampler, list(range(b)), [0] * b, pos, n
                    )
        _, _, cache, sampler = self.swap_rows(params, cache, sampler, [(0, 0)])  # compile it
        _, _, cache, sampler = self.copy_rows(params, cache, sampler, [0], [0], [0], [greedy])
        jax.block_until_ready(cache)
        return time.perf_counter() - t0

    def attn_len_for(self, n: int) -> int:
        return bucket_for(max(n, 1), self.shapes.attn_lens)

    def prefill(
        self,
        params,
        cache: Cache,
        sampler: SamplerState,
        prompts: list[list[int]],
        rows: list[int],
        sampling: list[SamplingParams],
        starts: list[int] | None = None,
        histories: list[list[int]] | None = None,
        seeds: list[int] | None = None,
        masks: np.ndarray | None = None,
        restore: list[int] | None = None,
        checkpoint: list[int] | None = None,
        spans: list[list[EmbedSpan]] | None = None,
        logprobs: list[bool] | None = None,
        next_tokens: list[int | None] | None = None,
        wait: bool = True,
    ):
        """Prefill several prompts (the suffixes after `starts`) into the given cache rows and
        sample each one's first token. `histories` seed the repeat-penalty window (default:
        the prompts). `restore` / `checkpoint` (default none): per prompt, the checkpoint
        slot its row resumes from / saves into after (-1: none; see `_prefill`). `spans[i]`:
        prompt i's embedded spans, their starts relative to the prompt's first token
        (`tsjax.spans`; none: text only).
        `logprobs` (default none): rows whose sampled tokens get log-probabilities, from this
        prefill's first token on. `next_tokens` (default none): rows whose prompt positions
        get log-probabilities, each with the token that follows its part of the prompt (-1
        where none does: its last position's entry is then meaningless; None: the row gets
        none). Returns (first tokens [n] numpy, logits [n, V], cache, sampler); `wait=False`
        returns at once with a one-step `PendingTokens` (which also holds the
        log-probabilities and the pooled states) in place of the tokens and None for the
        logits."""
        n = len(prompts)
        starts = starts or [0] * n
        b = bucket_for(n, self.shapes.prefill_batches)
        t = bucket_for(max(len(p) for p in prompts), self.shapes.prefill_lens)
        tok = np.zeros((b, t), np.int32)
        row_arr = np.full((b,), self.shapes.rows, np.int32)  # padding rows are dropped
        st = np.zeros((b,), np.int32)
        ln = np.ones((b,), np.int32)
        targets = np.zeros((b, t), np.int32)
        scored = _flags(None if next_tokens is None else [x is not None for x in next_tokens], b)
        for i, (p, r, s) in enumerate(zip(prompts, rows, starts, strict=True)):
            tok[i, : len(p)] = p
            row_arr[i], st[i], ln[i] = r, s, len(p)
            if scored[i]:
                targets[i, : len(p) - 1] = p[1:]
                targets[i, len(p) - 1] = max(next_tokens[i], 0)  # type: ignore[index]
        pad = [SamplingParams.greedy()] * (b - n)
        hist = list(histories or prompts) + [[]] * (b - n)
        seeds = None if seeds is None else list(seeds) + [0] * (b - n)
        flags = list(_flags(logprobs, b))
        new_sampler = host_sampler_state(list(sampling) + pad, hist, seeds, flags)
        if self.plan is not None:
            new_sampler = put_tree(new_sampler, self.plan.replicated())
        attn_len = self.attn_len_for(min(int((st + t).max()), self.shapes.max_len))
        inputs = None
        if spans is not None and any(spans):
            padded = list(spans) + [[]] * (b - n)
            host = span_inputs(padded, st, t, self.cfg.dim, np.dtype(self.dtype))
            inputs = SpanInputs(*(self._put(a) for a in host))
        first, logits, cache, sampler, (lp, pooled, prompt) = self.prefill_fn(
            params,
            cache,
            sampler,
            new_sampler,
            self._put(tok),
            self._put(row_arr),
            self._put(st),
            self._put(ln),
            self._put(self._mask_rows(masks, np.arange(n), b)),
            self._put(_slots(restore, b)),
            self._put(_slots(checkpoint, b)),
            self._put(targets),
            self._put(scored),
            inputs,
            attn_len=attn_len,
        )
        if not wait:
            pending = PendingTokens(
                first[None], 1, np.arange(n), first, jax.tree.map(lambda a: a[None], lp),
                pooled, prompt,
            )  # fmt: skip
            return pending, None, cache, sampler
        return np.asarray(first[:n]), logits[:n], cache, sampler

    def _mask_rows(self, masks: np.ndarray | None, where: np.ndarray, b: int) -> np.ndarray:
        """Grammar bitmasks for b rows: rows `where` from `masks`, the rest allow everything.
        Always an array (never None) so constrained requests reuse the warmed shapes."""
        out = np.full((b, mask_words(self.cfg.vocab_size)), -1, np.int32)
        if masks is not None:
            out[where] = masks
        return out

    def decode(
        self,
        params,
        cache,
        sampler,
        rows: list[int],
        tokens: list[int] | PendingTokens,
        max_pos: int,
        n_steps: int = 1,
        masks: np.ndarray | None = None,
        wait: bool = True,
    ):
        """Run `n_steps` decode steps for the given cache rows, fed `tokens` (one per row);
        `max_pos` is the longest of those rows' lengths now. The step runs on the cache rows
        [0, b), b the decode bucket holding the highest of `rows`; the others in it idle
        (keep live rows low: `swap_rows`). Returns (tokens [n_steps, len(rows)] numpy, last
        logits [len(rows), V], cache, sampler).

        `tokens` a previous decode's `PendingTokens` feeds each row the token that decode
        sampled for it, without it ever leaving the device: the engine dispatches the next
        decode before it has read the previous one's tokens. That needs the same rows, with
        no prefill or swap in between (`tsjax.runner.LocalRunner` keeps track). `wait=False`
        returns at once with a `PendingTokens` in place of the tokens (read them with
        `.get()`, which waits) and None for the logits."""
        b = bucket_for(max(rows) + 1, self.shapes.decode_batches)  # may pass the cache rows
        attn_len = self.attn_len_for(min(max_pos + n_steps, self.shapes.max_len))
        where = np.asarray(rows)
        active = np.zeros((b,), bool)
        active[where] = True
        if isinstance(tokens, PendingTokens):
            fed, halted = tokens.next, tokens.halted
            if halted is None:  # a prefill's first tokens: no row has halted
                halted = self._put(np.zeros((b,), bool))
            if not np.array_equal(tokens.where, where):  # b follows rows
                raise ValueError("device tokens continue the previous decode's rows only")
        else:
            tok = np.zeros((b,), np.int32)
            tok[where] = tokens
            fed, halted = self._put(tok), self._put(np.zeros((b,), bool))
        out, nxt, halted, logits, lps, cache, sampler = self.decode_fn(
            params,
            cache,
            sampler,
            fed,
            self._put(active),
            halted,
            self._put(self._mask_rows(masks, where, b)),
            self._put(np.int32(n_steps)),
            attn_len=attn_len,
            max_steps=steps_bucket(n_steps),
        )
        pending = PendingTokens(out, n_steps, where, nxt, lps, halted=halted)
        if not wait:
            return pending, None, cache, sampler
        return pending.get(), logits[self._put(where)], cache, sampler

    #: Row pairs one `swap_rows` dispatch exchanges (more are done in several).
    SWAP_PAIRS = 4

    def swap_rows(self, params, cache, sampler, pairs: list[tuple[int, int]]):
        """Exchange the contents of cache rows (keys, values, length, sampling state) for
        each (a, b) in `pairs` (no row in two pairs; (a, a) is a no-op). The engine moves
        live requests into the lowest rows with this, so decode runs the smallest bucket;
        swapping (not copying) keeps what the free rows cached for prefix reuse. `params` is
        unused (the same signature as the other steps). Returns (None, None, cache,
        sampler)."""
        del params
        for i in range(0, len(pairs), self.SWAP_PAIRS):
            chunk = pairs[i : i + self.SWAP_PAIRS]
            a = np.full((self.SWAP_PAIRS,), self.shapes.rows, np.int32)  # padding: no-op
            b = a.copy()
            a[: len(chunk)] = [x for x, _ in chunk]
            b[: len(chunk)] = [y for _, y in chunk]
            cache, sampler = self.swap_fn(cache, sampler, self._put(a), self._put(b))
        return None, None, cache, sampler

    def copy_rows(
        self,
        params,
        cache,
        sampler,
        src: list[int],
        dst: list[int],
        lengths: list[int],
        sampling: list[SamplingParams],
        histories: list[list[int]] | None = None,
        seeds: list[int] | None = None,
        logprobs: list[bool] | None = None,
    ):
        """Row dst[i] becomes a copy of row src[i] (every layer's state; src rows keep theirs)
        holding its first lengths[i] tokens, with a fresh sampling state from sampling[i]
        (`histories`, `seeds`, `logprobs` as in `prefill`; default histories empty). dst may
        name a row of src (its sampling state is replaced, its cache kept). Several answers
        to one prompt share its prefill this way (the engine's `n`). At most `shapes.rows`
        rows, in one dispatch of one compiled shape. `params` is unused. Returns (None, None,
        cache, sampler)."""
        del params
        rows, n = self.shapes.rows, len(dst)
        if n > rows:
            raise ValueError(f"copy_rows copies at most {rows} rows, got {n}")
        pad = rows - n
        src_arr = np.asarray(list(src) + [0] * pad, np.int32)
        dst_arr = np.asarray(list(dst) + [rows] * pad, np.int32)  # padding: dropped
        len_arr = np.asarray(list(lengths) + [0] * pad, np.int32)
        hist = list(histories or [[]] * n) + [[]] * pad
        seeds = None if seeds is None else list(seeds) + [0] * pad
        new_sampler = host_sampler_state(
            list(sampling) + [SamplingParams.greedy()] * pad,
            hist,
            seeds,
            list(_flags(logprobs, rows)),
        )
        if self.plan is not None:
            new_sampler = put_tree(new_sampler, self.plan.replicated())
        cache, sampler = self.copy_fn(
            cache, sampler, new_sampler, self._put(src_arr), self._put(dst_arr), self._put(len_arr)
        )
        return None, None, cache, sampler
