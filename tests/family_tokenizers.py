"""Tiny tokenizers with each family's special tokens, split rules and chat template.

The tiny random models of `hf_factory` need a tokenizer that llama.cpp's converter accepts and
that behaves like the real family's where the serving code looks: the same kind of vocabulary
(SentencePiece, SentencePiece-style BPE in ``tokenizer.json``, or byte-level BPE), the same
pre-tokenizer split regex (so the ``tokenizer.ggml.pre`` name the converter is told to write is
true), the family's control and user-defined tokens (chat turns, thinking, tool calls, image and
audio markers) with the real token types, and the real chat template. Only the vocabulary itself
is tiny: 512 entries trained on a fixed corpus of common English words, digits and JSON
punctuation, so that prompts tokenize to many short pieces.

Special tokens are given as ``(text, special)``: ``special=True`` becomes a CONTROL token in the
GGUF (never produced by plain text, hidden when decoding), ``False`` a USER_DEFINED one (matched
as a whole in text, rendered when decoding), as the real checkpoints declare them.

Chat templates come from ``models/templates`` of the pinned llama.cpp tree (`converter`): the
templates llama.cpp tests its own chat parsers with, copied from the real checkpoints. Gemma 3
has none there; `GEMMA3_TEMPLATE` is the template of Google's gemma-3-*-it checkpoints.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB_SIZE = 512

# Pre-tokenizer split regexes as the real tokenizer.json files write them (llama.cpp quotes the
# same strings in llama-vocab.cpp next to its own rewrites), keyed by `tokenizer.ggml.pre`.
SPLIT_REGEX: dict[str, str] = {
    "qwen35": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}|"
    r" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt-4o": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "tekken": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}

_WORDS = (
    "the a of to and in is it you that he was for on are with as I his they be at one have "
    "this from or had by hot word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come did "
    "number sound no most people my over know water than call first who may down side been "
    "now find any new work part take get place made live where after back little only round "
    "man year came show every good me give our under name very through just form sentence "
    "great think say help low line differ turn cause much mean before move right boy old too "
    "same tell does set three want air well also play small end put home read hand port large "
    "spell add even land here must big high such follow act why ask men change went light "
    "kind off need house picture try us again animal point mother world near build self earth "
    "father image weather city tool function name arguments value true false null Paris"
).split()
_PUNCT = ["", "", "", ",", ".", "?", ":", '"', "{", "}", "(", ")", "[", "]", "\n"]


def corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic training text: common words, numbers, JSON-ish punctuation, newlines."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) + rng.choice(_PUNCT) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        lines.append(" ".join(words))
    return lines


def family_template(file_name: str) -> str:
    """A chat template from the pinned llama.cpp tree's ``models/templates`` directory."""
    from converter import converter_root

    return (converter_root() / "models" / "templates" / file_name).read_text(encoding="utf-8")


def _write_template(out: Path, template: str) -> None:
    # transformers 5 and the converter's SpecialVocab both read chat_template.jinja
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")


# ----------------------------------------------------------------------------- byte-level BPE


def byte_bpe_tokenizer(
    out: Path,
    *,
    pre: str,
    specials: list[tuple[str, bool]],
    bos: str | None,
    eos: str,
    pad: str | None = None,
    unk: str | None = None,
    specials_first: bool = False,
    template: str | None = None,
    vocab_size: int = VOCAB_SIZE,
) -> dict[str, int]:
    """A GPT-2-style byte-level BPE (Qwen, GPT-OSS, Mistral tekken, Nemotron) saved to `out`.

    pre: a key of `SPLIT_REGEX`: the text is split by the family's regex, then byte-encoded.
    specials_first: give the special tokens ids 0.. (Mistral/Nemotron layout) instead of ids after
    the learned vocabulary (Qwen, GPT-OSS layout). Returns {special text: id}.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    first = [t for t, _ in specials] if specials_first else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - (0 if specials_first else len(specials)),
        special_tokens=first,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    for text, special in specials:  # in order, so that ids follow the list
        added = AddedToken(text, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk
    )
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(str(out))
    if template is not None:
        _write_template(out, template)
    ids = {t: tok.token_to_id(t) for t, _ in specials}
    assert len(fast) <= vocab_size, (len(fast), vocab_size)
    return ids


# ----------------------------------------------------------------------------- SentencePiece


def _train_spm(work: Path, user_symbols: list[str], vocab_size: int) -> Path:
    """A BPE SentencePiece model with Gemma's fixed ids: pad 0, eos 1, bos 2, unk 3."""
    import sentencepiece as spm

    text = work / "corpus.txt"
    text.write_text("\n".join(corpus()) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(work / "spm"), vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=user_symbols,
        byte_fallback=True, add_dummy_prefix=False, split_by_whitespace=False,
        normalization_rule_name="identity", character_coverage=1.0, minloglevel=2,
        remove_extra_whitespaces=False, num_threads=1,
    )  # fmt: skip
    text.unlink()
    return work / "spm.model"


def declare_specials(out: Path, specials: list[tuple[str, bool]], ids: dict[str, int]) -> None:
    """Declare the specials in tokenizer_config.json's added_tokens_decoder, as real repos do.

    The converter types a SentencePiece piece listed there CONTROL when ``special`` is true and
    USER_DEFINED otherwise (``_create_vocab_sentencepiece``). Call it again after anything
    that rewrites tokenizer_config.json (a processor's save_pretrained does).
    """
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("vocab_file", None)  # transformers records the absolute path it loaded from
    decoder = cfg.setdefault("added_tokens_decoder", {})
    for text, special in specials:
        decoder[str(ids[text])] = {
            "content": text, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special,
        }  # fmt: skip
    path.write_text(json.dumps(cfg, indent=1))


def gemma_spm_tokenizer(
    out: Path,
    specials: list[tuple[str, bool]],
    *,
    template: str,
    extra_special_tokens: dict[str, str] | None = None,
    keep_model_file: bool = True,
    vocab_size: int = VOCAB_SIZE,
) -> dict[str, int]:
    """A Gemma-style SentencePiece tokenizer (``tokenizer.model`` + ``tokenizer.json``).

    Gemma 3 checkpoints ship both files and the converter reads ``tokenizer.model``. Gemma 4
    checkpoints ship only ``tokenizer.json`` (SentencePiece-style BPE with byte fallback; the
    converter reads it with ``LlamaHfVocab`` and writes ``tokenizer.ggml.model = "gemma4"`` with
    merges): pass ``keep_model_file=False``. Returns {special text: id}.
    """
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    model = _train_spm(out, [t for t, _ in specials], vocab_size)
    (out / "tokenizer.model").write_bytes(model.read_bytes())
    proc = spm.SentencePieceProcessor(model_file=str(model))
    ids = {t: proc.piece_to_id(t) for t, _ in specials}
    model.unlink()
    (out / "spm.vocab").unlink()
    tok = GemmaTokenizer.from_pretrained(str(out), extra_special_tokens=extra_special_tokens or {})
    tok.chat_template = template
    tok.save_pretrained(str(out))
    _write_template(out, template)
    declare_specials(out, specials, ids)
    if keep_model_file:
        # Real Gemma repos list their markers in added_tokens.json; the converter types them
        # USER_DEFINED from there (tokenizer_config's added_tokens_decoder then refines them).
        (out / "added_tokens.json").write_text(json.dumps(ids, indent=1))
    else:
        (out / "tokenizer.model").unlink()
    return ids


# Google's gemma-3-*-it chat template (tokenizer_config.json of those checkpoints): the system
# prompt is folded into the first user turn, images become <start_of_image>.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
