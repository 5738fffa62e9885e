"""Structured outputs and tool calling through the official openai client, on a random-weight model with
n-gram speculation on: JSON schemas validate, regexes and choices match, tool calls round-trip."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from meshserve.engine.async_llm import AsyncLLM
from meshserve.server.serve import ServerThread, free_port

MODEL = "tiny-llama"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "size": {"enum": ["S", "M", "L"]},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
        "owner": {
            "type": "object",
            "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["age"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "size", "flags", "owner"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 3,
    "prompt_lookup_max": 3,
    "prompt_lookup_min": 1,
    "disable_by_batch_size": None,
}
MESSAGES = [{"role": "user", "content": "Describe a thing as JSON."}]


@pytest.fixture(scope="module")
def client(model_dir):
    llm = AsyncLLM.from_args(model_dir, max_model_len=512, block_size=4, speculative_config=NGRAM)
    running = ServerThread(llm, MODEL, free_port())
    yield openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0)
    running.stop()


def chat(client, max_tokens: int = 160, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=max_tokens, **kwargs)


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_validates_for_n_2(client, stream):
    settings = {"n": 2, "temperature": 1.0, "seed": 5, "response_format": RESPONSE_FORMAT}
    if stream:
        texts = ["", ""]
        for chunk in chat(client, stream=True, **settings):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
    else:
        texts = [c.message.content for c in chat(client, **settings).choices]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_regex_choice_and_vllms_older_names(client):
    text = chat(client, response_format={"type": "json_object"}, extra_body={"seed": 2}).choices[0]
    assert text.message.content.startswith("{")
    pattern = r"\d{3}-[A-Z]{2}"
    out = client.completions.create(
        model=MODEL, prompt="id:", max_tokens=20, extra_body={"structured_outputs": {"regex": pattern}}
    )
    assert re.fullmatch(pattern, out.choices[0].text)
    choices = ["red", "green", "blue"]
    out = chat(client, n=3, temperature=1.0, extra_body={"guided_choice": choices})
    assert {c.message.content for c in out.choices} <= set(choices)
    out = chat(client, extra_body={"guided_regex": "(yes|no)!"})
    assert out.choices[0].message.content in ("yes!", "no!")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"guided_regex": "(unclosed"}, "guided_regex.regex"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_json"),
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),  # auto needs a parser
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
    ],
)
def test_bad_specs_are_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, extra_body=extra)
    assert err.value.body["param"].startswith(param)


def tool_round_trip(client, tool_choice, stream: bool) -> tuple[list, str]:
    """tools -> tool_calls -> tool message -> an answer; returns the calls and the answer's text."""
    kwargs = {
        "tools": [WEATHER, TIME],
        "tool_choice": tool_choice,
        "parallel_tool_calls": False,  # one call: a random model may otherwise list calls past max_tokens
        "temperature": 0.8,
        "seed": 1,
    }
    if stream:
        calls, reason = {}, None
        for chunk in chat(client, stream=True, **kwargs):
            for delta in chunk.choices[0].delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            reason = chunk.choices[0].finish_reason or reason
        calls = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for _, c in sorted(calls.items())
        ]
    else:
        choice = chat(client, **kwargs).choices[0]
        reason = choice.finish_reason
        calls = [c.model_dump() for c in choice.message.tool_calls or []]
    assert reason == "tool_calls" and calls
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": calls},
        *[{"role": "tool", "tool_call_id": c["id"], "content": '{"temp": 21}'} for c in calls],
    ]
    answer = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8)
    return calls, answer.choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_round_trip(client, stream):
    calls, reason = tool_round_trip(client, "required", stream)
    tools = {"get_weather": WEATHER, "get_time": TIME}
    for call in calls:
        schema = tools[call["function"]["name"]]["function"]["parameters"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    assert reason in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_round_trip(client, stream):
    named = {"type": "function", "function": {"name": "get_time"}}
    calls, _ = tool_round_trip(client, named, stream)
    assert [c["function"]["name"] for c in calls] == ["get_time"]
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), TIME["function"]["parameters"])


def test_tool_choice_none_is_plain_text(client):
    choice = chat(client, tools=[WEATHER], tool_choice="none", max_tokens=4).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")


def test_a_named_functions_arguments_stream_as_they_are_generated(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    deltas = [
        chunk.choices[0].delta.tool_calls[0]
        for chunk in chat(client, stream=True, tools=[TIME], tool_choice=named)
        if chunk.choices and chunk.choices[0].delta.tool_calls
    ]
    assert len(deltas) > 1 and deltas[0].id and deltas[0].function.name == "get_time"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    jsonschema.validate(
        json.loads("".join(d.function.arguments for d in deltas)), TIME["function"]["parameters"]
    )
