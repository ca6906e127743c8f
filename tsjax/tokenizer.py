"""Tokenizers rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.

A GGUF carries no `tokenizer.json`, only the vocabulary, merges or scores, token types and flags,
under llama.cpp's key names. Every vocabulary kind served here is rebuilt as a `tokenizers` BPE
model, so encoding runs in Rust:

* `gpt2` (byte-level BPE: SmolLM, Llama 3, Qwen...): the file's merges, plus the split regexes
  llama.cpp uses for the file's `tokenizer.ggml.pre`.
* `llama` (SentencePiece BPE: Llama 2, Mistral, Gemma...): there are no merges in the file, so they
  are derived from the vocabulary, best-scoring result first, which is what SentencePiece's
  score-driven bigram merging does. Spaces become `▁`; unknown bytes fall back to `<0xNN>` tokens.
* `gemma4` (Gemma 4: BPE over SentencePiece-style pieces): the file's merges, spaces as `▁`,
  `<0xNN>` byte fallback, the text split only at newlines (llama.cpp's `gemma4` pre-type).

Control tokens (type 3) and user-defined tokens (type 4) are matched whole in the text before
the BPE sees it. Ids match Hugging Face transformers loading the same GGUF (the tests check this),
except where transformers drops the model's own pre-tokenizer: it has no "smollm" split, so it
keeps a digit with the spaces before it, where SmolLM's tokenizer.json and llama.cpp do not.
Decoding does not go through `tokenizers`: every id maps to the exact bytes it stands for
(`token_to_piece`), so text can be streamed without ever splitting a UTF-8 character.
"""

from __future__ import annotations

import codecs
import logging
import re
import threading
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

if TYPE_CHECKING:
    from tsjax.gguf import GGUFFile

logger = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Texts of control tokens that end a turn; llama.cpp treats them as end-of-generation too.
EOG_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>",
        "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>", "_<EOT>",
        "<end_of_utterance>", "<｜end▁of▁sentence｜>", "<turn|>", "<|tool_response>",
    }
)  # fmt: skip


def _harmony_message_ends(tokens: list[str]) -> set[int]:
    """In a Harmony vocabulary (GPT-OSS: `<|return|>` and `<|call|>` end the answer),
    `<|end|>` ends one message, not the answer: the model goes on with `<|start|>assistant`
    (its analysis message, then the final one), so it must not stop generation. llama.cpp
    makes the same exception (llama-vocab.cpp); elsewhere (Phi 3) `<|end|>` ends the turn."""
    if "<|return|>" in tokens and "<|call|>" in tokens:
        return {i for i, t in enumerate(tokens) if t == "<|end|>"}
    return set()


# Split regexes per `tokenizer.ggml.pre`, applied in order (as llama.cpp's llama-vocab.cpp does),
# written in the Oniguruma syntax `tokenizers` uses. Pieces a regex leaves unmatched stay pieces.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CJK = "[一-龥ࠀ-一가-퟿]+"
_DEEPSEEK_LETTERS = (  # cased letters; escaped because NFC would rewrite some of them
    "\\s?["
    "A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370"
    "-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-"
    "\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd"
    "\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18"
    "-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-"
    "\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-"
    "\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124"
    "\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183"
    "\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21"
    "-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
    "]+"
)
_DEEPSEEK3_WORDS = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_FINNISH = r" ?[^(\s|.,!?…。，、।۔،)]+"

_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2,),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "tekken": (_TEKKEN,),
    "gpt-4o": (_GPT4O,),
    "starcoder": (r"\p{N}", _GPT2),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"),
    "deepseek-llm": (
        r"[\r\n]",
        _DEEPSEEK_LETTERS,
        r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
        r"\s+$",
        _CJK,
        r"\p{N}+",
    ),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
    "deepseek-v3": (r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", _DEEPSEEK3_WORDS),
    "bloom": (_FINNISH,),
    "viking": (_FINNISH, r"\p{N}"),
    "seed-coder": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "bailingmoe": (
        r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
}
# `tokenizer.ggml.pre` names -> the entry above, as llama.cpp groups them.
_PRE_ALIASES: dict[str, str] = {
    **dict.fromkeys(("gpt2", "gpt-2", "mpt", "olmo", "jais", "phi-2", "exaone4", "trillion",
                     "granite-docling", "gigachat", "a.x-4.0", "mellum", "jina-es", "jina-de",
                     "jina-v2-es", "jina-v2-de", "jina-v1-en", "jina-v2-code", "roberta-bpe"),
                    "default"),
    **dict.fromkeys(("llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), "llama3"),
    **dict.fromkeys(("deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
                     "grok-2"), "qwen2"),
    **dict.fromkeys(("llama4", "kanana2", "talkie", "minimax-m2"), "gpt-4o"),
    **dict.fromkeys(("refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
                    "starcoder"),
    **dict.fromkeys(("poro-chat", "gpt3-finnish"), "bloom"),
    **dict.fromkeys(("hunyuan-dense", "joyai-llm"), "deepseek-v3"),
    **dict.fromkeys(("bailingmoe2", "llada-moe"), "bailingmoe"),
}  # fmt: skip
# Splits whose original tokenizer.json sets `ignore_merges` (a whole piece in the vocab wins).
_IGNORE_MERGES = frozenset({"llama3", "tekken"})
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_types(metadata: dict[str, Any], n: int) -> np.ndarray:
    types = metadata.get("tokenizer.ggml.token_type")
    if types is None:
        return np.full(n, NORMAL, dtype=np.int32)
    return np.asarray(types, dtype=np.int32)


def _meta_id(metadata: dict[str, Any], key: str, n: int) -> int | None:
    value = metadata.get(f"tokenizer.ggml.{key}")
    return int(value) if value is not None and 0 <= int(value) < n else None


def _spm_merges(vocab: dict[str, int], rank: Sequence[float]) -> list[tuple[str, str]]:
    """Every (left, right) split of a token into two tokens, best-ranked result first.

    With these as BPE merges, BPE performs SentencePiece's merge loop (join the adjacent pair whose
    result scores best). Ties break as transformers' `generate_merges` does (longer left piece,
    then longer right piece, then vocabulary order), so ids match it exactly.
    """
    lefts: list[int] = []
    rights: list[int] = []
    owner: list[int] = []
    get = vocab.get
    for token, tid in vocab.items():
        for k in range(1, len(token)):
            left = get(token[:k])
            if left is not None:
                right = get(token[k:])
                if right is not None:
                    lefts.append(left)
                    rights.append(right)
                    owner.append(tid)
    if not owner:
        return []
    size = max(vocab.values()) + 1
    text: list[str] = [""] * size
    order = np.zeros(size, dtype=np.int64)  # position in the vocabulary's iteration order
    for position, (token, tid) in enumerate(vocab.items()):
        text[tid] = token
        order[tid] = position
    length = np.fromiter(map(len, text), dtype=np.int64, count=size)
    left_ids, right_ids, owner_ids = np.array(lefts), np.array(rights), np.array(owner)
    score = np.asarray(rank, dtype=np.float64)[owner_ids]
    keys = (
        right_ids,
        left_ids,
        order[owner_ids],
        -length[right_ids],
        -length[left_ids],
        -score,
    )  # np.lexsort: last key first
    best = np.lexsort(keys)
    pairs = zip(left_ids[best].tolist(), right_ids[best].tolist(), strict=True)
    return [(text[a], text[b]) for a, b in pairs]


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary. Build it with `from_gguf` or `from_file`.

    `add_bos` / `add_eos` are the file's flags (what `encode` does by default);
    `strip_leading_space` is set for SentencePiece files with `add_space_prefix`, whose encoding
    prepends a "▁" that decoding takes off again.
    """

    def __init__(
        self,
        backend: _Backend,
        tokens: list[str],
        token_types: np.ndarray,
        pieces: list[bytes],
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None,
        eog_ids: Iterable[int],
        add_bos: bool,
        add_eos: bool,
        strip_leading_space: bool,
    ):
        self._backend = backend
        self._tokens = tokens
        self._pieces = pieces
        self._ids = {t: i for i, t in reversed(list(enumerate(tokens)))}  # first id wins
        self._bos_id, self._eos_id, self._pad_id = bos_id, eos_id, pad_id
        self._eog_ids = frozenset(eog_ids)
        self._special_ids = frozenset(np.flatnonzero(token_types == CONTROL).tolist())
        self._user_defined_ids = frozenset(np.flatnonzero(token_types == USER_DEFINED).tolist())
        # The control tokens the backend matches in text with parse_special: text -> id.
        self._controls = {
            t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special
        }
        self._control_lut = np.zeros(max(len(tokens), 1), dtype=bool)
        self._control_lut[list(self._controls.values())] = True
        self.add_bos, self.add_eos = add_bos, add_eos
        self.strip_leading_space = strip_leading_space
        # SentencePiece's "▁" prefix goes on the text's first piece only; a piece that follows a
        # control token is encoded on its own by `encode_marked`, so it needs a "never" variant.
        self._pre_first = backend.pre_tokenizer
        self._pre_rest = (
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
            if strip_leading_space
            else None
        )
        # `encode_special_tokens` and the pre-tokenizer are state on the shared backend; the
        # lock keeps one call's settings from leaking into a concurrent one.
        self._lock = threading.Lock()

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_file(cls, gguf: GGUFFile | str | Path) -> Tokenizer:
        """The tokenizer of a GGUF file (a path, or an already opened `GGUFFile`)."""
        if isinstance(gguf, str | Path):
            from tsjax.gguf import GGUFFile

            gguf = GGUFFile(gguf)
        return cls.from_gguf(gguf.metadata)

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any]) -> Tokenizer:
        """The tokenizer that a GGUF metadata dict (`GGUFFile.metadata`) describes."""
        kind = metadata.get("tokenizer.ggml.model")
        if "tokenizer.ggml.tokens" not in metadata:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
        if kind == "gpt2":
            return cls._byte_level(metadata)
        if kind == "llama":
            return cls._sentencepiece(metadata)
        if kind == "gemma4":
            return cls._spm_bpe(metadata)
        raise ValueError(
            f"tokenizer.ggml.model {kind!r} is not supported (gpt2, llama, gemma4 are)"
        )

    @classmethod
    def _byte_level(cls, metadata: dict[str, Any]) -> Tokenizer:
        tokens = list(metadata["tokenizer.ggml.tokens"])
        types = _token_types(metadata, len(tokens))
        spelling = _bytes_to_unicode()
        unspell = {c: b for b, c in spelling.items()}
        # Normal tokens are spelled in GPT-2's byte alphabet; control and user-defined ones are
        # stored as the raw text they match (as llama.cpp's converter writes them).
        vocab: dict[str, int] = {}
        pieces: list[bytes] = []
        for i, (token, kind) in enumerate(zip(tokens, types.tolist(), strict=True)):
            if kind in (CONTROL, USER_DEFINED):
                key, piece = token, token.encode()
            elif all(c in unspell for c in token):
                key, piece = token, bytes(unspell[c] for c in token)
            else:  # a malformed entry: spell its UTF-8 bytes so it is at least reachable
                piece = token.encode()
                key = "".join(spelling[b] for b in piece)
            vocab[key] = i
            pieces.append(piece)

        merges = []
        for line in metadata.get("tokenizer.ggml.merges") or ():
            cut = line.find(" ", 1)
            left, right = line[:cut], line[cut + 1 :]
            if cut > 0 and left in vocab and right in vocab and left + right in vocab:
                merges.append((left, right))

        pre = metadata.get("tokenizer.ggml.pre") or "default"
        split = _PRE_ALIASES.get(pre, pre)
        if split not in _SPLITS:
            logger.warning("unknown tokenizer.ggml.pre %r: splitting text like GPT-2", pre)
            split = "default"
        backend = _Backend(
            models.BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                fuse_unk=False,
                ignore_merges=split in _IGNORE_MERGES,
            )
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _SPLITS[split]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        add_bos_default = split in ("llama3", "tekken")  # llama.cpp forces BOS for these
        return cls._finish(metadata, backend, vocab, tokens, types, pieces, add_bos_default, False)

    @classmethod
    def _sentencepiece(cls, metadata: dict[str, Any]) -> Tokenizer:
        tokens = list(metadata["tokenizer.ggml.tokens"])
        types = _token_types(metadata, len(tokens))
        # Gemma files need two fixes (transformers makes the same ones, by architecture):
        # runs of spaces stored as real spaces ("  ") are what the model's merges call "▁▁", and
        # the merge order follows token order, not the scores. Elsewhere a user-defined "  " stays
        # an added token matched in the raw text, and the score ranks the merges.
        gemma = str(metadata.get("general.architecture", "")).startswith("gemma")
        spelled = [
            t.replace(" ", "▁") if gemma and " " in t and not t.strip() else t for t in tokens
        ]
        vocab = {t: i for i, t in enumerate(spelled)}
        pieces = []
        for token, kind in zip(spelled, types.tolist(), strict=True):
            byte = _BYTE_TOKEN.fullmatch(token) if kind == BYTE else None
            if byte:
                pieces.append(bytes([int(byte.group(1), 16)]))
            elif kind == CONTROL:
                pieces.append(token.encode())
            else:
                pieces.append(token.replace("▁", " ").encode())

        scores = metadata.get("tokenizer.ggml.scores")
        if gemma or scores is None:
            rank: Sequence[float] = -np.arange(len(tokens), dtype=np.float64)
        else:
            rank = np.asarray(scores, dtype=np.float64)
        unk = _meta_id(metadata, "unknown_token_id", len(tokens))
        backend = _Backend(
            models.BPE(
                vocab=vocab,
                merges=_spm_merges(vocab, rank),
                dropout=None,
                unk_token=spelled[unk] if unk is not None else None,
                fuse_unk=True,
                byte_fallback=True,
            )
        )
        add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
        )
        # Added tokens are registered under the file's spelling, so a respelled "  " is left to
        # the merges (as transformers does) rather than matched as a user-defined token.
        return cls._finish(metadata, backend, vocab, tokens, types, pieces, True, add_prefix)

    @classmethod
    def _spm_bpe(cls, metadata: dict[str, Any]) -> Tokenizer:
        """`gemma4`: BPE with the file's merges over SentencePiece-style pieces (spaces spelled
        "▁", `<0xNN>` byte fallback), as llama.cpp runs it: spaces become "▁" and the text is
        split only into runs of newlines and runs of anything else; a run of newlines that is
        a token of its own is taken whole (llama.cpp's Gemma 4 fix, ggml-org/llama.cpp#21343),
        which `ignore_merges` does, and so does any other whole run in the vocabulary."""
        tokens = list(metadata["tokenizer.ggml.tokens"])
        types = _token_types(metadata, len(tokens))
        vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
        pieces = []
        for token, kind in zip(tokens, types.tolist(), strict=True):
            byte = _BYTE_TOKEN.fullmatch(token) if kind == BYTE else None
            if byte:
                pieces.append(bytes([int(byte.group(1), 16)]))
            elif kind == CONTROL:
                pieces.append(token.encode())
            else:
                pieces.append(token.replace("▁", " ").encode())
        merges = []
        for line in metadata.get("tokenizer.ggml.merges") or ():
            cut = line.find(" ", 1)
            left, right = line[:cut], line[cut + 1 :]
            if cut > 0 and left in vocab and right in vocab:
                merges.append((left, right))
        unk = _meta_id(metadata, "unknown_token_id", len(tokens))
        backend = _Backend(
            models.BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                unk_token=tokens[unk] if unk is not None else None,
                fuse_unk=True,
                byte_fallback=True,
                ignore_merges=True,
            )
        )
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|\n+"), behavior="isolated")
        # llama.cpp adds the BOS whatever the file says (it warns when the flag is off)
        metadata = {**metadata, "tokenizer.ggml.add_bos_token": True}
        return cls._finish(metadata, backend, vocab, tokens, types, pieces, True, False)

    @classmethod
    def _finish(
        cls,
        metadata: dict[str, Any],
        backend: _Backend,
        vocab: dict[str, int],
        tokens: list[str],
        types: np.ndarray,
        pieces: list[bytes],
        add_bos_default: bool,
        strip_leading_space: bool,
    ) -> Tokenizer:
        """Register control / user-defined tokens and read the special ids and flags."""
        backend.add_special_tokens(
            [
                AddedToken(tokens[i], normalized=False, special=True)
                for i in np.flatnonzero(types == CONTROL)
                if vocab.get(tokens[i]) == i
            ]
        )
        backend.add_tokens(
            [
                AddedToken(tokens[i], normalized=False, special=False)
                for i in np.flatnonzero(types == USER_DEFINED)
                if vocab.get(tokens[i]) == i
            ]
        )
        n = len(tokens)
        eos = _meta_id(metadata, "eos_token_id", n)
        ends = ("eos_token_id", "eot_token_id", "eom_token_id")
        eog = {i for key in ends if (i := _meta_id(metadata, key, n)) is not None}
        eog |= {i for i, token in enumerate(tokens) if token in EOG_TEXTS}
        eog -= _harmony_message_ends(tokens)
        return cls(
            backend,
            tokens,
            types,
            pieces,
            bos_id=_meta_id(metadata, "bos_token_id", n),
            eos_id=eos,
            pad_id=_meta_id(metadata, "padding_token_id", n),
            eog_ids=eog,
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
            add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            strip_leading_space=strip_leading_space,
        )

    # ---- vocabulary --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def eog_ids(self) -> frozenset[int]:
        """Ids that end generation: eos, eot, eom and turn-ending control tokens."""
        return self._eog_ids

    @property
    def special_ids(self) -> frozenset[int]:
        """Control tokens (bos, eos, turn markers): parsed from text only with parse_special,
        dropped by decode's `skip_special`."""
        return self._special_ids

    @property
    def user_defined_ids(self) -> frozenset[int]:
        """Tokens a converter added as text (Gemma 4's `<|tool_call>`, `<|channel>`, `<|"|>`;
        Qwen's `<tool_call>`): always matched in text, kept by decode."""
        return self._user_defined_ids

    @cached_property
    def control_texts(self) -> frozenset[str]:
        """The texts of the control tokens that `encode(parse_special=True)` turns into their
        ids (e.g. "<|im_end|>", "<start_of_turn>"); a chat template's markers are among them."""
        return frozenset(self._controls)

    def id_of(self, token: str) -> int | None:
        """The id of a token spelled as the GGUF stores it (e.g. "<|im_end|>", "Ġthe")."""
        return self._ids.get(token)

    def token_to_piece(self, token_id: int) -> bytes:
        """The bytes a token stands for; a control token gives its own text."""
        return self._pieces[token_id]

    @cached_property
    def max_piece_bytes(self) -> int:
        """The most bytes one token stands for: a text of n characters is at least
        n / max_piece_bytes tokens, a bound servers check before tokenizing a long text."""
        return max(map(len, self._pieces), default=1)

    # ---- encode / decode ---------------------------------------------------------------------

    def encode(
        self,
        text: str,
        *,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        parse_special: bool = True,
    ) -> list[int]:
        """Token ids for `text`. `add_bos`/`add_eos` None follow the file's flags.

        With parse_special False, control-token text such as "<|im_end|>" in user input is
        tokenized as plain text; user-defined tokens still match (as in llama.cpp).
        """
        with self._lock:
            self._backend.encode_special_tokens = not parse_special
            ids = self._backend_encode(text).ids
        if (self.add_bos if add_bos is None else add_bos) and self._bos_id is not None:
            ids.insert(0, self._bos_id)
        if (self.add_eos if add_eos is None else add_eos) and self._eos_id is not None:
            ids.append(self._eos_id)
        return ids

    def encode_marked(
        self,
        text: str,
        special_spans: Sequence[tuple[int, int]],
        *,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
    ) -> list[int]:
        """Token ids for `text` where control tokens are parsed only at `special_spans`.

        `special_spans` are the (start, end) character spans, in order, of the control tokens a
        chat template wrote itself (`ChatTemplate.render_marked`). Control-token text anywhere
        else, i.e. typed by a client, is tokenized as plain text, as llama.cpp does with
        parse_special=false and transformers with split_special_tokens. The text between two
        markers is one piece either way, so BPE merges across the boundary between template text
        and message content are those of `encode(text)`: when the control tokens `encode` finds
        are exactly the spans, its ids are returned unchanged.
        """
        spans = [(int(a), int(b)) for a, b in special_spans]
        end = 0
        for a, b in spans:
            if a < end or text[a:b] not in self._controls:
                raise ValueError(f"span {a}:{b} ({text[a:b]!r}) is not a control token in order")
            end = b
        with self._lock:
            self._backend.encode_special_tokens = False
            encoding = self._backend_encode(text)
            ids = encoding.ids
            where = np.flatnonzero(self._control_lut[np.asarray(ids, dtype=np.int64)])
            if [encoding.token_to_chars(int(i)) for i in where] != spans:
                ids = self._encode_between(text, spans)
        if (self.add_bos if add_bos is None else add_bos) and self._bos_id is not None:
            ids.insert(0, self._bos_id)
        if (self.add_eos if add_eos is None else add_eos) and self._eos_id is not None:
            ids.append(self._eos_id)
        return ids

    def _backend_encode(self, text: str) -> Any:
        """The backend's encoding of `text` (no added specials). Through `encode_batch`, which
        releases the GIL while it works (`encode` does not): a long text tokenized in a worker
        thread leaves the other threads running. The caller holds the lock."""
        return self._backend.encode_batch([text], add_special_tokens=False)[0]

    def _encode_between(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        """The control ids at `spans`, and every piece between them encoded with special
        parsing off: what the backend does with parse_special, split at `spans` only. The
        caller holds the lock."""
        backend = self._backend
        ids: list[int] = []
        pos = 0
        backend.encode_special_tokens = True
        try:
            for start, end in [*spans, (len(text), len(text))]:
                if start > pos:
                    if self._pre_rest is not None:
                        backend.pre_tokenizer = self._pre_first if pos == 0 else self._pre_rest
                    ids += self._backend_encode(text[pos:start]).ids
                if end > start:
                    ids.append(self._controls[text[start:end]])
                pos = end
        finally:
            backend.encode_special_tokens = False
            if self._pre_rest is not None:
                backend.pre_tokenizer = self._pre_first
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        special = self._special_ids if skip_special else frozenset()
        data = b"".join(self._pieces[i] for i in ids if i not in special)
        text = data.decode("utf-8", errors="replace")
        if self.strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def incremental_decoder(self, *, skip_special: bool = False) -> IncrementalDecoder:
        """A decoder for streaming: feed ids one by one, get text as it completes."""
        return IncrementalDecoder(self, skip_special=skip_special)


class IncrementalDecoder:
    """Turns a stream of token ids into text without splitting a UTF-8 character.

    A character may span several tokens (byte-fallback `<0xNN>` tokens, byte-level BPE pieces),
    so bytes are held until they complete. All `push` outputs plus `flush` equal `decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self._pieces = tokenizer._pieces
        self._skip = tokenizer.special_ids if skip_special else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = tokenizer.strip_leading_space  # only before the first character

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it completed (may be "")."""
        if token_id in self._skip:
            return ""
        return self._emit(self._utf8.decode(self._pieces[token_id]))

    def flush(self) -> str:
        """End of stream: any held incomplete bytes come out as U+FFFD."""
        return self._emit(self._utf8.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        if self._strip and text:
            self._strip = False
            if text.startswith(" "):
                text = text[1:]
        return text
