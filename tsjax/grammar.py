"""Constrained decoding: JSON schemas, any-JSON, regexes and EBNF grammars turned into a
per-step allowed-token bitmask by xgrammar, from the model's own GGUF vocabulary.

The bitmask ([ceil(V / 32)] int32 words, bit v % 32 of word v // 32 set = token v allowed) is
an array input of the compiled sampler, so constraining a request never recompiles and rows
without a constraint are untouched. Schemas are checked here, before any generation, so an
invalid one is a clear client error rather than a failure mid-stream.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from tsjax import crash
from tsjax.tokenizer import Tokenizer

_xgr = None
_xgr_lock = threading.Lock()


def _xgrammar():
    """The xgrammar module, imported once, with the process's crash handlers kept
    (`tsjax.crash`: the handlers its apache-tvm-ffi installs can deadlock a crashing process)."""
    global _xgr
    with _xgr_lock:
        if _xgr is None:
            import xgrammar

            crash.keep()
            _xgr = xgrammar
        return _xgr


class GrammarError(ValueError):
    """An invalid schema or grammar; the message says what is wrong."""


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


ALL_ALLOWED = -1  # an int32 word with every bit set
_UNMATCHABLE = b"\xff"  # never part of UTF-8 text


class Constraint:
    """One request's grammar state: which tokens may come next, and what has been accepted."""

    def __init__(self, matcher, vocab_size: int, description: str, compiled=None):
        self._matcher = matcher
        self._compiled = compiled
        self.vocab_size = vocab_size
        self.description = description

    def fork(self) -> Constraint:
        """A new constraint for the same grammar, at its start (another answer to the same
        request: the engine's `n`)."""
        xgr = _xgrammar()

        if self._compiled is None:
            raise ValueError("this constraint was made without its compiled grammar")
        return Constraint(
            xgr.GrammarMatcher(self._compiled), self.vocab_size, self.description, self._compiled
        )

    def fill(self, out: np.ndarray) -> None:
        """Write the allowed-token bitmask for the next token into `out` ([W] int32)."""
        self._matcher.fill_next_token_bitmask(out[None, :], 0)

    def accept(self, token: int) -> bool:
        """Advance past `token`; False if the grammar did not allow it."""
        return bool(self._matcher.accept_token(int(token)))

    @property
    def finished(self) -> bool:
        """The grammar is complete (only an end-of-generation token may follow)."""
        return bool(self._matcher.is_terminated())

    def allowed(self) -> np.ndarray:
        """The allowed token ids now (for tests and debugging)."""
        words = np.zeros((mask_words(self.vocab_size),), np.int32)
        self.fill(words)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.vocab_size]
        return np.nonzero(bits)[0]


class GrammarFactory:
    """Compiles constraints for one tokenizer (the vocabulary is read once, lazily)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self._compiler = None
        self._uncached = None
        self._lock = threading.Lock()

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()

                tok = self.tokenizer
                # Control tokens (<|im_start|>, <start_of_turn>, ...) are never text: their
                # piece is bytes no UTF-8 text contains (0xFF), so no string, JSON value or
                # free text a grammar allows can match one, while a `Token(id)` element (see
                # `marker`) still can: a tool-call format's own control tokens stay usable.
                special = tok.special_ids - tok.eog_ids
                vocab = [
                    _UNMATCHABLE + i.to_bytes(4, "big") if i in special else tok.token_to_piece(i)
                    for i in range(tok.vocab_size)
                ]
                info = xgr.TokenizerInfo(
                    vocab,
                    vocab_type=xgr.VocabType.RAW,
                    vocab_size=self.vocab_size,
                    stop_token_ids=sorted(tok.eog_ids),
                )
                self._compiler = xgr.GrammarCompiler(info, cache_enabled=True)
                # xgrammar 0.2.8's cache takes grammars that differ only in a `Token(id)` for
                # the same one (a later grammar then allows the earlier one's token).
                self._uncached = xgr.GrammarCompiler(info, cache_enabled=False)
            return self._compiler

    def _constraint(self, compiled, description: str) -> Constraint:
        xgr = _xgrammar()

        return Constraint(xgr.GrammarMatcher(compiled), self.vocab_size, description, compiled)

    def json_schema(self, schema: dict[str, Any] | str, *, strict: bool = True) -> Constraint:
        """Output must be JSON valid under `schema` (JSON Schema). `strict` forbids
        properties the schema does not name (xgrammar's strict mode)."""
        schema_obj = check_schema(schema)
        try:
            compiled = self._get_compiler().compile_json_schema(
                json.dumps(schema_obj), any_whitespace=False, strict_mode=strict
            )
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with a reason
            raise GrammarError(f"unsupported JSON schema: {e}") from e
        return self._constraint(compiled, "json_schema")

    def json_object(self) -> Constraint:
        """Output must be one JSON object (OpenAI `json_object`, Ollama `format: "json"`)."""
        return self.json_schema({"type": "object"}, strict=False)

    def structural(self, fmt: dict[str, Any]) -> Constraint:
        """Output must match `fmt`, an xgrammar structural-tag format (sequences, choices,
        repeats, tags, free text, JSON schemas, EBNF pieces and single tokens); pieces are
        combined without their rule names colliding. Build markers with `marker` and JSON
        bodies with `json_element`."""
        xgr = _xgrammar()

        try:
            grammar = xgr.Grammar.from_structural_tag({"type": "structural_tag", "format": fmt})
            cached = self._get_compiler()
            tokens = '"type": "token"' in json.dumps(fmt)
            compiled = (self._uncached if tokens else cached).compile_grammar(grammar)
        except Exception as e:
            raise GrammarError(f"invalid grammar: {e}") from e
        return self._constraint(compiled, "structural")

    def marker(self, text: str) -> dict[str, Any]:
        """A structural-tag element for a format's marker: the token when `text` is exactly one
        control or user-defined token (`[TOOL_CALLS]`, `<|channel|>`; Gemma 4's `<|tool_call>`),
        else the text itself. One token is how the model writes it and how the text tokenizes:
        the same text spelled in smaller pieces is not allowed."""
        tok = self.tokenizer
        i = tok.id_of(text)
        marks = tok.special_ids | tok.user_defined_ids
        if i is not None and i in marks and i not in tok.eog_ids:
            return {"type": "token", "token": int(i)}
        return {"type": "const_string", "value": text}

    def regex(self, pattern: str) -> Constraint:
        try:
            compiled = self._get_compiler().compile_regex(pattern)
        except Exception as e:
            raise GrammarError(f"invalid regex: {e}") from e
        return self._constraint(compiled, "regex")

    def ebnf(self, grammar: str, root: str = "root") -> Constraint:
        try:
            compiled = self._get_compiler().compile_grammar(grammar, root_rule_name=root)
        except Exception as e:
            raise GrammarError(f"invalid grammar: {e}") from e
        return self._constraint(compiled, "ebnf")


def check_schema(schema: dict[str, Any] | str) -> dict[str, Any]:
    """Parse and validate a JSON Schema against its metaschema; GrammarError says why not."""
    import jsonschema

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarError(f"schema is not valid JSON: {e}") from e
    if not isinstance(schema, dict):
        raise GrammarError(f"schema must be a JSON object, got {type(schema).__name__}")
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path) or "(root)"
        raise GrammarError(f"invalid JSON schema at {where}: {e.message}") from e
    return schema


def json_element(
    schema: dict[str, Any], *, strict: bool = True, excludes: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A structural-tag element for JSON valid under `schema`, in the compact layout of
    `GrammarFactory.json_schema` (one space after `:` and `,`, no other whitespace).

    `excludes`: text no string in the value may contain (a format's closing marker, which
    would end the call early); such elements are always strict and allow one whitespace
    character between tokens of the JSON. xgrammar drops string length limits where it
    applies excludes, so a schema with a `minLength`/`maxLength` keeps its limits instead."""
    xgr = _xgrammar()

    schema = check_schema(schema)
    text = json.dumps(schema)
    if excludes and '"minLength"' not in text and '"maxLength"' not in text:
        return {"type": "json_schema", "json_schema": schema, "excludes": list(excludes),
                "max_whitespace_cnt": 1}  # fmt: skip
    try:
        ebnf = str(xgr.Grammar.from_json_schema(
            json.dumps(schema), any_whitespace=False, strict_mode=strict))  # fmt: skip
    except Exception as e:
        raise GrammarError(f"unsupported JSON schema: {e}") from e
    return {"type": "grammar", "grammar": ebnf}
