"""Structured outputs in the engine: every completion matches its spec, with n > 1, prefix caching and
n-gram speculation (whose output stays token for token the same), and drafts the grammar rejects are
rejected with the matcher rolled back."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from meshserve import LLM, SamplingParams, StructuredOutputsParams
from meshserve.engine.grammar import apply_bitmask, decode_bitmask, verify_bitmask
from meshserve.errors import InputError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "kind": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
        "home": {
            "type": "object",
            "properties": {"floor": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["floor"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "tags", "home"],
    "additionalProperties": False,
}
NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 3,
    "prompt_lookup_max": 3,
    "prompt_lookup_min": 1,
    "disable_by_batch_size": None,
}
PROMPTS = ["hello there", "a b a b a b a b"]


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def plain(model) -> LLM:
    return LLM(model, max_model_len=256, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def speculative(model) -> LLM:
    return LLM(model, max_model_len=256, enable_prefix_caching=True, speculative_config=NGRAM)


def texts(llm: LLM, spec: StructuredOutputsParams, n: int = 2, finished: bool = True) -> list[str]:
    params = SamplingParams(n=n, temperature=1.0, seed=3, max_tokens=100, structured_outputs=spec)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert not finished or all(c.finish_reason == "stop" for o in outs for c in o.outputs)
    return [c.text for o in outs for c in o.outputs]


def test_json_schema_output_validates_for_each_completion_with_and_without_speculation(plain, speculative):
    spec = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    outputs = texts(plain, spec)
    for text in outputs:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert texts(speculative, spec) == outputs  # the grammar checks drafts; output is unchanged
    assert speculative.engine.spec.draft_tokens > 0


def test_json_object_regex_and_choice(plain, speculative):
    # any object: a random model may nest past max_tokens, so an unfinished one is only an object's start
    for text in texts(speculative, StructuredOutputsParams(json_object=True), finished=False):
        assert text.startswith("{")
    pattern = r"[a-c]{2,4}-\d{3}"
    for text in texts(speculative, StructuredOutputsParams(regex=pattern)):
        assert re.fullmatch(pattern, text)
    choices = ["yes", "no", "not sure"]
    assert set(texts(plain, StructuredOutputsParams(choice=choices), n=4)) <= set(choices)


def test_ebnf_grammar(plain):
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    for text in texts(plain, StructuredOutputsParams(grammar=grammar)):
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text)


def test_a_rejected_draft_is_rejected_and_the_matcher_rolls_back(plain):
    grammars = plain.engine.grammars
    tok = plain.engine.tokenizer
    matcher = grammars.matcher(StructuredOutputsParams(regex="ab+c"))
    a, b, c = (tok.backend.token_to_id(x) for x in "abc")
    vocab = plain.engine.model_config.vocab_size
    before = decode_bitmask([matcher], vocab)
    masks = verify_bitmask([matcher], [[a, b, a]], 4, vocab)  # the second "a" breaks the grammar
    assert torch.equal(decode_bitmask([matcher], vocab), before)  # rolled back to where it began
    logits = apply_bitmask(torch.zeros(4, vocab), masks)
    allowed = [set(torch.nonzero(row.isfinite()).flatten().tolist()) for row in logits]
    assert a in allowed[0] and not {b, c} & allowed[0] and b in allowed[1] and c not in allowed[1]
    assert a not in allowed[2] and {b, c} <= allowed[2]  # the target can never pick the rejected draft
    assert len(allowed[3]) == vocab  # past the rejected draft: never kept, left unmasked


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"regex": "(ab"}, "structured_outputs.regex"),
        ({"json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "structured_outputs.json"),
        ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar"),
    ],
)
def test_a_spec_the_compiler_refuses_names_its_field(plain, spec, field):
    with pytest.raises(InputError) as err:
        plain.generate(["hi"], SamplingParams(structured_outputs=StructuredOutputsParams(**spec)))
    assert err.value.field == field


def test_exactly_one_kind_is_set():
    with pytest.raises(InputError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(InputError, match="structured_outputs.json"):
        StructuredOutputsParams(json="{not json")
    assert (
        StructuredOutputsParams(json={"b": 1, "a": 2}).key
        == StructuredOutputsParams(json='{"a":2,"b":1}').key
    )


def test_a_complete_grammar_ends_the_request_even_with_ignore_eos(plain):
    spec = StructuredOutputsParams(choice=["yes", "no"])
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, structured_outputs=spec)
    (out,) = plain.generate(["hi"], params, use_tqdm=False)
    assert out.outputs[0].text in ("yes", "no") and out.outputs[0].finish_reason == "stop"
