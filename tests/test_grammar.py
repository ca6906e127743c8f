"""Grammar constraints over the real SmolLM2 vocabulary: every path the mask allows ends in
output that parses and validates; invalid schemas are refused before any generation."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from conftest import real_model_path

from tsjax.gguf import GGUFFile
from tsjax.grammar import GrammarError, GrammarFactory
from tsjax.tokenizer import Tokenizer

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {"x": {"type": ["number", "null"]}, "ok": {"type": "boolean"}},
        "required": ["x", "ok"],
    },
]


@pytest.fixture(scope="module")
def factory():
    tok = Tokenizer.from_gguf(GGUFFile(real_model_path("smollm2-135m")).metadata)
    return GrammarFactory(tok)


def random_walk(factory, constraint, seed, limit=150):
    """Sample uniformly among allowed tokens, preferring to end once the grammar allows it."""
    rng = np.random.default_rng(seed)
    eog = factory.tokenizer.eog_ids
    out = []
    for _ in range(limit):
        allowed = constraint.allowed()
        assert len(allowed), "the mask allowed nothing"
        ends = [t for t in allowed if t in eog]
        choices = [t for t in allowed if t not in eog]
        if ends and (not choices or len(out) > limit // 2 or rng.random() < 0.3):
            return factory.tokenizer.decode(out)
        if len(out) > 30:  # steer towards closing the value so every walk ends
            closing = [t for t in choices if factory.tokenizer.decode([t]) in ('"', "]", "}")]
            choices = closing or choices
        t = int(rng.choice(choices))
        assert constraint.accept(t)
        out.append(t)
    pytest.skip("walk did not finish within the token limit")


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_every_allowed_path_validates(factory, i):
    for seed in range(3):
        text = random_walk(factory, factory.json_schema(SCHEMAS[i]), seed)
        jsonschema.validate(json.loads(text), SCHEMAS[i])


def test_json_object_gives_an_object(factory):
    text = random_walk(factory, factory.json_object(), 7)
    assert isinstance(json.loads(text), dict)


def test_control_tokens_are_never_allowed(factory):
    c = factory.json_schema({"type": "string"})
    assert c.accept(factory.tokenizer.encode('"', add_bos=False)[0])
    special = factory.tokenizer.special_ids - factory.tokenizer.eog_ids
    assert not special & set(c.allowed().tolist())


@pytest.mark.parametrize(
    "schema, message",
    [
        ({"type": "objekt"}, "invalid JSON schema"),
        ({"properties": {"a": {"minimum": "zero"}}}, "invalid JSON schema"),
        ("{not json", "not valid JSON"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_invalid_schemas_are_refused(factory, schema, message):
    with pytest.raises(GrammarError, match=message):
        factory.json_schema(schema)


@pytest.mark.slow
def test_constrained_generation_with_the_real_model_validates():
    """The compiled sampler applies the mask: greedy SmolLM2 output parses and validates."""
    from conftest import loaded_model

    from tsjax.generation import generate
    from tsjax.sampling import SamplingParams

    model = loaded_model("smollm2-135m", max_len=512)
    factory = GrammarFactory(model.tokenizer, model.config.vocab_size)
    ids = model.render_chat([{"role": "user", "content": "Describe a cat as JSON."}])
    for i, schema in enumerate(SCHEMAS):
        sp = SamplingParams.greedy() if i == 0 else SamplingParams(temperature=0.8, seed=i)
        res = generate(
            model, ids, sampling=sp, max_tokens=120, constraint=factory.json_schema(schema)
        )
        jsonschema.validate(json.loads(res.text), schema)
        assert res.finish_reason == "stop"
