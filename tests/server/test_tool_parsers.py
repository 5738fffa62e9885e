"""Tool-call parsers: each format's calls come out as (name, arguments JSON); anything else is content."""

from __future__ import annotations

import json

import pytest

from meshserve.errors import InputError
from meshserve.server.tool_parsers import PARSERS, ToolCall
from meshserve.server.tools import plan_tools

WEATHER = ToolCall("get_weather", json.dumps({"city": "Oslo"}))
TIME = ToolCall("get_time", json.dumps({"zone": "UTC"}))


@pytest.mark.parametrize(
    ("parser", "text", "content", "calls"),
    [
        (
            "hermes",
            "Let me check.\n"
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>',
            "Let me check.",
            [WEATHER, TIME],
        ),
        (
            "hermes",
            '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}',
            None,
            [TIME],
        ),  # cut at EOS
        ("hermes", "<tool_call>{broken</tool_call>", "<tool_call>{broken</tool_call>", []),
        (
            "llama3_json",
            '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
            '{"name": "get_time", "parameters": {"zone": "UTC"}}',
            None,
            [WEATHER, TIME],
        ),
        ("llama3_json", "The weather is fine.", "The weather is fine.", []),
        (
            "mistral",
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
            '{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}]',
            None,
            [WEATHER, TIME],
        ),
        ("mistral", 'Sure[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}', "Sure", [WEATHER]),
        ("mistral", "[TOOL_CALLS] not json", "[TOOL_CALLS] not json", []),
    ],
)
def test_parsers(parser, text, content, calls):
    assert PARSERS[parser](text) == (content, calls)


def test_tool_plans():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert plan_tools(None, None, True, None).mode == "none"
    assert plan_tools([tool], "none", True, None).tools is None  # the template sees no tools
    assert plan_tools([tool], None, True, "hermes").mode == "auto"
    required = plan_tools([tool], "required", False, None)
    assert json.loads(required.structured.json)["maxItems"] == 1
    assert required.calls('[{"name": "f", "parameters": {"a": 1}}]') == (None, [ToolCall("f", '{"a": 1}')])
    named = plan_tools([tool], {"type": "function", "function": {"name": "f"}}, True, None)
    assert named.calls('{"a": 1}') == (None, [ToolCall("f", '{"a": 1}')])
    assert named.calls('{"a": ') == ('{"a": ', [])  # cut by max_tokens: left as content
    with pytest.raises(InputError, match="needs tools"):
        plan_tools(None, "required", True, None)
