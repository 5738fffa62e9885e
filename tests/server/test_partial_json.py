"""partial_json: the text so far of a JSON value fixes a prefix of its canonical form, never more; and
ToolStream's deltas add up to the parsers' whole calls for every format, however the text is cut."""

from __future__ import annotations

import json

import pytest

from meshserve.server.partial_json import canonical_prefix, partial_calls
from meshserve.server.tool_parsers import PARSERS
from meshserve.server.tool_stream import ToolStream
from meshserve.server.tools import plan_tools

RAW = '{"city":"Par\\u00e9is \\"x\\" \\ud83d\\ude00\\n","n":[1, 2.50,-3e2 ,0],"ok":true,"z":null, "o":{}}'
TOOLS = [{"type": "function", "function": {"name": n}} for n in ("get_weather", "f")]


@pytest.mark.parametrize("memo", [None, {}], ids=["fresh", "resumed"])
def test_every_prefix_of_the_raw_text_gives_a_prefix_of_the_canonical_text(memo):
    final = json.dumps(json.loads(RAW), ensure_ascii=False)
    before = ""
    for k in range(len(RAW) + 1):
        text, end = canonical_prefix(RAW[:k], 0, memo)
        assert final.startswith(text) and text.startswith(before), RAW[:k]
        before = text
        assert end == (len(RAW) if k == len(RAW) else None)
    assert before == final


@pytest.mark.parametrize(("raw", "fixed"), [("12", ""), ("[1.", "["), ('"a\\u00', '"a'), ('"\\ud83d', '"')])
def test_what_could_still_change_is_held_back(raw, fixed):
    assert canonical_prefix(raw) == (fixed, None)


def test_call_objects_one_after_another():
    raw = '{"name": "a", "parameters": {"x": 1}}; {"parameters": {}, "name": "b"}; {"name": "c", "param'
    assert partial_calls(raw, 0, ("parameters",), ";") == [("a", '{"x": 1}'), ("b", "{}"), ("c", "")]


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (
            "hermes",
            'Hi.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "d": [3]}}</tool_call>',
        ),
        ("hermes", 'A <tool_ that is not one, and "{"name": "f"}"'),
        (
            "llama3_json",
            '<|python_tag|>{"name": "get_weather", "parameters": {"c": 1}}; {"name": "f", "parameters": {}}',
        ),
        ("llama3_json", " {not json"),
        (
            "mistral",
            'Hi [TOOL_CALLS][{"name": "get_weather", "arguments": {"c": 1}}, {"name": "f", "arguments": {}}]',
        ),
        ("mistral", 'Hi [TOOL_CALLS]get_weather[ARGS]{"c": "x"}[TOOL_CALLS]f[ARGS]{"a": [1, 2]}'),
    ],
)
@pytest.mark.parametrize("step", [1, 3, 7])
def test_deltas_add_up_to_the_parsers_calls(parser, text, step):
    stream = ToolStream(plan_tools(TOOLS, "auto", True, parser))
    content, calls, reason = "", {}, None
    pieces = [text[i : i + step] for i in range(0, len(text), step)]
    for i, piece in enumerate(pieces):
        finish = "stop" if i == len(pieces) - 1 else None
        chunk = stream.chunk(
            {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": finish}]}
        )
        choice = chunk["choices"][0]
        content += choice["delta"].get("content") or ""
        for delta in choice["delta"].get("tool_calls", []):
            call = calls.setdefault(delta["index"], ["", ""])
            call[0] += delta["function"].get("name", "")
            call[1] += delta["function"].get("arguments", "")
        reason = choice["finish_reason"]
    want_content, want = PARSERS[parser](text)
    assert [tuple(calls[i]) for i in sorted(calls)] == [(c.name, c.arguments) for c in want]
    assert (content or None, reason) == (want_content, "tool_calls" if want else "stop")
