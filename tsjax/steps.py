"""The compiled steps: `prefill` writes prompt tokens into cache rows and returns the logits
of each row's last token; `decode` advances every row by one token.

Params and the cache are arguments (the cache is donated, so XLA updates it in place). Only
shapes are static: the batch and token buckets of prefill, and `attn_len`, the bucket of
cache positions attention reads. Everything else a request can vary is array data.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
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
from tsjax.programs import Key, Programs
from tsjax.residency import release_free_memory
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
                shapes.cache_blocks(),
                shapes.skip_min_rows,
                checkpoints=shapes.checkpoints,
                native_attention=mesh is None,
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
        # The executables by shape (`tsjax.programs`). `lazy`: warm-up compiles only the
        # shapes the first requests need (`first_keys`); a shape not compiled yet is served by
        # a compiled one that covers it (more rows, tokens or positions: padding) while it
        # compiles in the background, and compiled on the spot only when nothing covers it.
        # Off by default (every shape up front, as tests and multi-process runs need: the
        # processes of one job must pick the same shapes); the server turns it on.
        self.lazy = False
        self.programs = Programs(self._lower, release_free_memory)
        # Lazy: shapes served by a covering program, their own asked for when the runner is
        # idle (`request_deferred`) or once they have waited `DEFER_S` (key -> first wanted)
        self._deferred: dict[Key, float] = {}
        self._specs: tuple | None = None  # abstract (params, cache, sampler)

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
    def mrope(self) -> bool:
        """Whether the model's positions are M-RoPE's (image spans carry 3-D offsets)."""
        return bool(self.cfg.mrope_sections)

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

    # -- compiled programs ------------------------------------------------------------------

    def compiled_count(self) -> int:
        """How many shapes the steps have compiled so far (tests assert it stays put): the
        programs by shape (the prefills with embedded spans among them), and whatever the
        jitted prefill and row copy compiled when called directly."""
        return len(self.programs.keys()) + sum(
            f._cache_size() for f in (self.prefill_fn, self.copy_fn)
        )

    def _remember(self, params) -> None:
        """The abstract (params, cache, sampler) every program is lowered for, taken once:
        shapes, dtypes and shardings only, so a background compile holds no buffers."""
        if self._specs is not None:
            return
        cache = jax.eval_shape(self._zero_cache if self.plan is None else self._create_cache)
        self._specs = (
            jax.tree.map(_spec, params),
            cache,
            jax.tree.map(_spec, self.new_sampler()),
        )

    def _lower(self, key: Key) -> jax.stages.Lowered:
        """Lower one program from abstract inputs (any thread; see `tsjax.programs`)."""
        assert self._specs is not None, "a step or warmup must run first"
        params, cache, sampler = self._specs
        kind, *sizes = key
        if kind in ("prefill", "span_prefill"):
            b, t, attn_len = sizes
            host = self._prefill_inputs([[0]] * b, [self.shapes.rows] * b, [0] * b, b, t)
            spans = None
            if kind == "span_prefill":
                arrays = span_inputs([[]] * b, np.zeros((b,), np.int32), t, self.cfg.dim,
                                     np.dtype(self.dtype), self.mrope)  # fmt: skip
                spans = jax.tree.map(lambda a: _spec(self._put(a)), arrays)
            return self.prefill_fn.lower(params, cache, sampler, *host, spans, attn_len=attn_len)
        if kind == "decode":
            b, attn_len, max_steps = sizes
            host = self._decode_inputs(np.zeros((b,), np.int32), np.arange(1), b, None, 1)
            return self.decode_fn.lower(
                params, cache, sampler, *host, attn_len=attn_len, max_steps=max_steps
            )
        assert kind == "swap", key
        pad = self._put(np.zeros((self.SWAP_PAIRS,), np.int32))
        return self.swap_fn.lower(cache, sampler, pad, pad)

    def _run(self, key: Key, *args):
        exe = self.programs.get(key) or self.programs.compile(key)
        return exe(*args)

    def first_keys(
        self, decode_steps: tuple[int, ...] = (1,), max_prompt: int | None = None
    ) -> list[Key]:
        """What `lazy` warm-up compiles before the server is ready: the one-prompt prefill of
        the longest chunk and the decode of every row up to 512 positions. They cover every
        prefill and decode up to 512 positions (a shorter prompt or fewer rows run padded), so
        no request waits for a compile; the exact smaller shapes (`later_keys`) compile in
        the background right after, and serve from then on."""
        sh = self.shapes
        top = bucket_for(min(max_prompt or sh.max_len, sh.max_len), sh.prefill_lens)
        ms = steps_bucket(max(decode_steps))
        attn = self.attn_len_for(min(512, sh.max_len))
        return [
            ("prefill", 1, top, self.attn_len_for(min(top, sh.max_len))),
            ("decode", sh.decode_batches[-1], attn, ms),
        ]

    def later_keys(
        self, decode_steps: tuple[int, ...] = (1,), max_prompt: int | None = None
    ) -> list[Key]:
        """What `lazy` warm-up queues for the background once ready, in order: the shapes a
        single user's first requests reach (the prefill of a short prompt, the decode of the
        fewest rows), the swap, and the longest chunk's prefill at every position (a cover
        for any prefill after a reused prefix; compiling it up front took as long as the rest
        together)."""
        sh = self.shapes
        top = bucket_for(min(max_prompt or sh.max_len, sh.max_len), sh.prefill_lens)
        short = bucket_for(min(128, top), sh.prefill_lens)
        ms = steps_bucket(max(decode_steps))
        attn = self.attn_len_for(min(512, sh.max_len))
        keys = [("prefill", 1, short, self.attn_len_for(min(short, sh.max_len)))]
        keys += [("decode", sh.decode_batches[0], attn, ms), ("swap",)]
        keys.append(("prefill", 1, top, sh.attn_lens[-1]))
        return [
            k for k in dict.fromkeys(keys) if k not in self.first_keys(decode_steps, max_prompt)
        ]

    def all_keys(
        self,
        decode_steps: tuple[int, ...] = (1,),
        max_prompt: int | None = None,
        batches: tuple[int, ...] = (1,),
    ) -> list[Key]:
        """Every shape a fresh prompt of up to `max_prompt` tokens in a prefill of `batches`
        prompts and any decode of up to max(`decode_steps`) steps reach, and the swap."""
        sh = self.shapes
        top = max_prompt or sh.max_len
        keys: list[Key] = []
        for b in batches:
            for t in sh.prefill_lens:
                if t > top:
                    break
                keys.append(("prefill", bucket_for(b, sh.prefill_batches), t,
                             self.attn_len_for(min(t, sh.max_len))))  # fmt: skip
        for b in sh.decode_batches:
            for attn_len in sh.attn_lens:
                for ms in sorted({steps_bucket(n) for n in decode_steps}):
                    keys.append(("decode", b, attn_len, ms))
        return [*keys, ("swap",)]

    def warmup(
        self,
        params,
        decode_steps: tuple[int, ...] = (1,),
        max_prompt: int | None = None,
        batches: tuple[int, ...] = (1,),
        span_lens: tuple[int, ...] = (),
    ) -> float:
        """Compile the programs requests will use, before any runs: every shape of
        `all_keys`, or with `lazy` only `first_keys` (and `later_keys` in the background);
        and the prefill with embedded spans for the buckets of `span_lens` (prompt lengths;
        one row) and, unless `lazy`, the row copy. Returns seconds."""
        t0 = time.perf_counter()
        self._remember(params)
        spans = self.span_keys(span_lens)
        if self.lazy:
            # two at a time: XLA compiles one program on one core, and tracing (which holds
            # the GIL) of one overlaps the other's compile
            with ThreadPoolExecutor(2, thread_name_prefix="tsjax-warmup") as pool:
                keys = self.first_keys(decode_steps, max_prompt) + spans
                list(pool.map(lambda k: self.programs.compile(k, "ahead"), keys))
            for key in self.later_keys(decode_steps, max_prompt):
                self.programs.request(key)
        else:
            for key in self.all_keys(decode_steps, max_prompt, batches) + spans:
                self.programs.compile(key, "ahead")
            # jitted (not by shape), compiled by running it; lazy: on first use (n answers)
            cache, sampler = self.new_cache(), self.new_sampler()
            _, _, cache, sampler = self.copy_rows(
                params, cache, sampler, [0], [0], [0], [SamplingParams.greedy()]
            )
            jax.block_until_ready(cache)
            del cache, sampler
        release_free_memory()
        return time.perf_counter() - t0

    def span_keys(self, span_lens: tuple[int, ...] = ()) -> list[Key]:
        """The one-row prefills with embedded spans for prompts of `span_lens` tokens: one
        program per token bucket, at the widest attention bucket, so a chunk holding an
        image at any position has one (`prefill`)."""
        lens = self.shapes.prefill_lens
        wide = self.attn_len_for(self.shapes.max_len)
        buckets = sorted({bucket_for(n, lens) for n in span_lens})
        return [("span_prefill", 1, t, wide) for t in buckets]

    def _cover(self, kind: str, fits) -> Key | None:
        """The smallest compiled program of `kind` whose sizes pass `fits` (None: none)."""
        fitting = [k for k in self.programs.keys() if k[0] == kind and fits(*k[1:])]
        return min(fitting, key=lambda k: (k[1] * k[2], k[1:])) if fitting else None

    def _prefill_key(self, b: int, t: int, top_start: int, reach: int) -> Key:
        """The prefill program to run b prompts of up to t tokens (buckets) from positions up
        to `top_start`, the last token at most at position `reach` - 1: the exact one if
        compiled (or when not `lazy`), else a compiled one with as many rows and tokens or
        more whose attention reaches `reach` (its padding tokens are neither written nor
        read), the exact one then compiling in the background; else the exact one (compiled
        now)."""
        max_len = self.shapes.max_len
        want = ("prefill", b, t, self.attn_len_for(min(top_start + t, max_len)))
        if not self.lazy or want in self.programs:
            return want
        least = self.attn_len_for(min(reach, max_len))
        cover = self._cover("prefill", lambda b2, t2, a2: b2 >= b and t2 >= t and a2 >= least)
        if cover is None:
            return want
        self._defer(want)
        return cover

    #: Seconds a shape served by a covering program waits for an idle moment before it is
    #: compiled anyway (a server never idle still gets its exact shapes).
    DEFER_S = 30.0

    def _defer(self, key: Key) -> None:
        """Compile `key` in the background once the runner is idle (`request_deferred`), not
        now: a compile takes one of a small machine's cores (and the GIL, to trace) from
        the requests being served (on 2 cores, timed ad hoc: 16-row decode steps 25 -> ~45
        ms while one ran; in `tsjax bench --http` a 16-client round 2.8 -> 4.4 s around one).
        A key wanted for `DEFER_S` already is asked for at once."""
        first = self._deferred.setdefault(key, time.monotonic())
        if time.monotonic() - first >= self.DEFER_S:
            del self._deferred[key]
            self.programs.request(key)

    @property
    def deferred(self) -> int:
        """Shapes waiting for the runner to be idle to compile (`_defer`)."""
        return len(self._deferred)

    def request_deferred(self) -> None:
        """The runner is idle: compile the deferred shapes in the background (`_defer`)."""
        keys, self._deferred = list(self._deferred), {}
        for key in keys:
            self.programs.request(key)

    def _decode_key(self, b: int, max_pos: int, n_steps: int, fed_rows: int | None) -> Key:
        """The decode program for the cache rows [0, b) (a bucket) at up to `max_pos`
        positions and n_steps steps; `fed_rows`: the row count of the device tokens it
        continues from, which the program must take. Lazy: as `_prefill_key`, and once a
        row is halfway through its attention bucket the next bucket compiles in the
        background ahead of anything queued there, for the rows the decode continues from
        (what the next dispatch takes while the rows stay; after a change of rows it covers
        the smaller bucket b), so a growing answer rarely waits for one."""
        sh = self.shapes
        attn_len = self.attn_len_for(min(max_pos + n_steps, sh.max_len))
        ms = steps_bucket(n_steps)
        want = ("decode", b, attn_len, ms)
        if not self.lazy:
            return ("decode", fed_rows or b, attn_len, ms)
        need_b = fed_rows or b
        if 2 * (max_pos + n_steps) > attn_len and attn_len < sh.attn_lens[-1]:
            nxt = bucket_for(attn_len + 1, sh.attn_lens)

            def fits(b2, a2, m2):
                rows_fit = b2 == need_b if fed_rows else b2 >= need_b
                return rows_fit and a2 >= nxt and m2 >= n_steps

            if self._cover("decode", fits) is None:
                self.programs.request(("decode", need_b, nxt, ms), soon=True)
        if fed_rows is None and want in self.programs:
            return want
        cover = self._cover("decode", lambda b2, a2, m2: (b2 == need_b if fed_rows else b2 >= b)
                            and a2 >= attn_len and m2 >= n_steps)  # fmt: skip
        if cover is None:
            return ("decode", need_b, attn_len, ms)
        if cover != want:
            self._defer(want)
        return cover

    # -- host-side entry points -----------------------------------------------------------

    def attn_len_for(self, n: int) -> int:
        return bucket_for(max(n, 1), self.shapes.attn_lens)

    def _prefill_inputs(
        self,
        prompts: list[list[int]],
        rows: list[int],
        starts: list[int],
        b: int,
        t: int,
        sampling: list[SamplingParams] | None = None,
        histories: list[list[int]] | None = None,
        seeds: list[int] | None = None,
        masks: np.ndarray | None = None,
        restore: list[int] | None = None,
        checkpoint: list[int] | None = None,
        logprobs: list[bool] | None = None,
        next_tokens: list[int | None] | None = None,
    ) -> tuple:
        """The prefill program's inputs after (params, cache, sampler) and before the spans,
        for b rows of t tokens (`prompts` first, padding after)."""
        n = len(prompts)
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
        sampling = list(sampling or [SamplingParams.greedy()] * n)
        pad = [SamplingParams.greedy()] * (b - n)
        hist = list(histories or prompts) + [[]] * (b - n)
        seeds = None if seeds is None else list(seeds) + [0] * (b - n)
        flags = list(_flags(logprobs, b))
        new_sampler = host_sampler_state(sampling + pad, hist, seeds, flags)
        if self.plan is not None:
            new_sampler = put_tree(new_sampler, self.plan.replicated())
        return (
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
        )

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
        self._remember(params)
        n = len(prompts)
        starts = starts or [0] * n
        b = bucket_for(n, self.shapes.prefill_batches)
        t = bucket_for(max(len(p) for p in prompts), self.shapes.prefill_lens)
        with_spans = spans is not None and any(spans)
        if with_spans:  # a program of its own kind (never a cover for text prefills)
            # at the widest attention bucket: one program per token bucket serves a chunk with
            # an image at any position (warmed at start), so no image request compiles
            key = ("span_prefill", b, t, self.attn_len_for(self.shapes.max_len))
        else:
            reach = max(s + len(p) for s, p in zip(starts, prompts, strict=True))
            key = self._prefill_key(b, t, max(starts), reach)
        _, b, t, _ = key
        host = self._prefill_inputs(prompts, rows, starts, b, t, sampling, histories, seeds,
                                    masks, restore, checkpoint, logprobs, next_tokens)  # fmt: skip
        inputs = None
        if with_spans:
            padded = list(spans) + [[]] * (b - n)  # type: ignore[arg-type]
            st = np.zeros((b,), np.int32)
            st[:n] = starts
            arrays = span_inputs(padded, st, t, self.cfg.dim, np.dtype(self.dtype), self.mrope)
            inputs = jax.tree.map(self._put, arrays)
        out = self._run(key, params, cache, sampler, *host, inputs)
        first, logits, cache, sampler, (lp, pooled, prompt) = out
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

    def _decode_inputs(
        self, fed, where: np.ndarray, b: int, masks, n_steps: int, halted=None
    ) -> tuple:
        """The decode program's inputs after (params, cache, sampler) for the cache rows
        [0, b), `where` active, fed `fed` ([b] numpy, or the device tokens of a decode) with
        `halted` (the previous decode's device flags; None: no row has halted)."""
        active = np.zeros((b,), bool)
        active[where] = True
        if isinstance(fed, np.ndarray):
            fed = self._put(fed)
        if halted is None:
            halted = self._put(np.zeros((b,), bool))
        return (
            fed,
            self._put(active),
            halted,
            self._put(self._mask_rows(masks, where, b)),
            self._put(np.int32(n_steps)),
        )

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
        self._remember(params)
        b = bucket_for(max(rows) + 1, self.shapes.decode_batches)  # may pass the cache rows
        where = np.asarray(rows)
        if isinstance(tokens, PendingTokens):
            if not np.array_equal(tokens.where, where):  # b follows rows
                raise ValueError("device tokens continue the previous decode's rows only")
            fed, halted = tokens.next, tokens.halted  # None after a prefill: none halted
            key = self._decode_key(b, max_pos, n_steps, int(fed.shape[0]))
        else:
            key = self._decode_key(b, max_pos, n_steps, None)
            fed = np.zeros((key[1],), np.int32)
            fed[where] = tokens
            halted = None
        host = self._decode_inputs(fed, where, key[1], masks, n_steps, halted)
        run = self._run(key, params, cache, sampler, *host)
        out, nxt, halted, logits, lps, cache, sampler = run
        pending = PendingTokens(out, n_steps, where, nxt, lps, halted=halted)
        if not wait:
            return pending, None, cache, sampler
        return pending.get(), logits[self._put(where)], cache, sampler

    #: Row pairs one `swap_rows` dispatch exchanges (more are done in several). One: the
    #: step reads the moved rows whole into a temporary (every layer's keys and values at
    #: every position), 897 MB with 4 pairs for SmolLM2 at 2048 positions (XLA's
    #: memory analysis, benchmarks/ISSUE16_FINDINGS.md), a quarter of it with one.
    SWAP_PAIRS = 1

    def prefill_ready(self, lens: list[int], starts: list[int]) -> bool:
        """Whether text prompts of `lens` new tokens from positions `starts` prefill together
        (`prefill` of them all at once) on a program of their own batch and token buckets,
        at any attention bucket reaching them: a batch padded to more rows or tokens can cost
        more than the prompts one by one. Lazy: a program not compiled yet says False (the
        engine then prefills them one by one: nobody waits for a compile) and is compiled
        once the runner is idle (`_defer`). Not lazy: True (compiled on first use, as every
        shape is)."""
        if not self.lazy or self._specs is None:
            return True
        sh = self.shapes
        b = bucket_for(len(lens), sh.prefill_batches)
        t = bucket_for(max(lens), sh.prefill_lens)
        reach = max(s + n for s, n in zip(starts, lens, strict=True))
        want = ("prefill", b, t, self.attn_len_for(min(max(starts) + t, sh.max_len)))
        least = self.attn_len_for(min(reach, sh.max_len))
        if want in self.programs or self._cover(
            "prefill", lambda b2, t2, a2: b2 == b and t2 == t and a2 >= least
        ):
            return True
        self._defer(want)
        return False

    def swap_ready(self) -> bool:
        """Whether `swap_rows` runs without compiling first. Lazy: a swap not compiled yet is
        asked for in the background, ahead of the queue, and this says False meanwhile (an
        engine that moved rows anyway waited 12 s for it on a loaded machine, every stream
        with it)."""
        if not self.lazy or self._specs is None or ("swap",) in self.programs:
            return True
        self.programs.request(("swap",), soon=True)
        return False

    def swap_rows(self, params, cache, sampler, pairs: list[tuple[int, int]]):
        """Exchange the contents of cache rows (keys, values, length, sampling state) for
        each (a, b) in `pairs` (no row in two pairs; (a, a) is a no-op). The engine moves
        live requests into the lowest rows with this, so decode runs the smallest bucket;
        swapping (not copying) keeps what the free rows cached for prefix reuse. `params` is
        unused (the same signature as the other steps). Returns (None, None, cache,
        sampler)."""
        if params is not None:
            self._remember(params)
        for i in range(0, len(pairs), self.SWAP_PAIRS):
            chunk = pairs[i : i + self.SWAP_PAIRS]
            a = np.full((self.SWAP_PAIRS,), self.shapes.rows, np.int32)  # padding: no-op
            b = a.copy()
            a[: len(chunk)] = [x for x, _ in chunk]
            b[: len(chunk)] = [y for _, y in chunk]
            a, b = self._put(a), self._put(b)
            if self._specs is None:  # nothing to lower from yet (no params seen): plain jit
                cache, sampler = self.swap_fn(cache, sampler, a, b)
            else:
                cache, sampler = self._run(("swap",), cache, sampler, a, b)
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


def _spec(x) -> jax.ShapeDtypeStruct:
    """An array's abstract value: shape, dtype, weak type and sharding, no buffer."""
    aval = getattr(x, "aval", None)
    weak = bool(getattr(aval, "weak_type", False))
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding, weak_type=weak)
