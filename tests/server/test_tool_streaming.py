"""Tool calls stream as they are generated under tool_choice auto (each --tool-call-parser format) and
required, through the official openai client: the deltas add up to the non-streamed message, arguments
arrive in several chunks, parallel calls get index 0 and 1, and the choice ends with "tool_calls".

A random-weight model writes no tool calls of its own, so a regex (structured outputs) makes it write
the format's text: the parser reads it as it would a trained model's."""

from __future__ import annotations

import json

import openai
import pytest

from meshserve.engine.async_llm import AsyncLLM
from meshserve.server.serve import ServerThread, free_port

MODEL = "tiny-llama"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}
MESSAGES = [{"role": "user", "content": "Weather and time in Paris?"}]
CALL_1 = r'"name": "get_weather", "{args}": \{{"city": "(Paris|Oslo)", "unit": "(C|F)"\}}'
CALL_2 = r'"name": "get_time", "{args}": \{{"zone": "[A-Z]{{3}}"\}}'
# each format's text of two calls, as a trained model would write it
FORMATS = {
    "hermes": r"Let me check\.\n<tool_call>\n\{"
    + CALL_1.format(args="arguments")
    + r"\}\n</tool_call>\n<tool_call>\n\{"
    + CALL_2.format(args="arguments")
    + r"\}\n</tool_call>",
    "llama3_json": r"\{"
    + CALL_1.format(args="parameters")
    + r"\}; \{"
    + CALL_2.format(args="parameters")
    + r"\}",
    "mistral": r"Let me check\.\[TOOL_CALLS\]\[\{"
    + CALL_1.format(args="arguments")
    + r"\}, \{"
    + CALL_2.format(args="arguments")
    + r"\}\]",
}


@pytest.fixture(scope="module", params=list(FORMATS))
def parser_client(request, tiny_model_dir):
    llm = AsyncLLM.from_args(str(tiny_model_dir("llama")), max_model_len=512, block_size=4)
    running = ServerThread(llm, MODEL, free_port(), tool_parser=request.param)
    yield request.param, openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0)
    running.stop()


def chat(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=400, temperature=0, **kwargs
    )


def streamed(client: openai.OpenAI, **kwargs) -> tuple[str | None, list[dict], str | None, list]:
    """(content, calls, finish_reason, every tool-call delta) of a streamed choice, joined as a client
    would join them."""
    content, calls, reason, deltas = "", {}, None, []
    for chunk in chat(client, stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                deltas.append(delta)
                call = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            reason = choice.finish_reason or reason
    joined = [{"name": c["name"], "arguments": c["arguments"]} for _, c in sorted(calls.items())]
    return content or None, joined, reason, deltas


def test_auto_tool_calls_stream_as_generated_and_add_up_to_the_message(parser_client):
    parser, client = parser_client
    force = {"structured_outputs": {"regex": FORMATS[parser]}}
    choice = chat(client, extra_body=force).choices[0]
    want = [{"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls]
    content, calls, reason, deltas = streamed(client, extra_body=force)
    assert [c["name"] for c in want] == ["get_weather", "get_time"] and choice.finish_reason == "tool_calls"
    assert (content, calls, reason) == (choice.message.content, want, "tool_calls")
    assert sorted({d.index for d in deltas}) == [0, 1]
    firsts = [d for d in deltas if d.id]  # one first delta per call: id, type and name
    assert [(d.index, d.type, d.function.name) for d in firsts] == [
        (0, "function", "get_weather"),
        (1, "function", "get_time"),
    ]
    assert sum(bool(d.function.arguments) for d in deltas if d.index == 0) > 1  # arguments in pieces
    assert json.loads(calls[0]["arguments"])["unit"] in ("C", "F")


def test_required_tool_calls_stream_as_generated(parser_client):
    _, client = parser_client
    settings = {"tool_choice": "required", "parallel_tool_calls": False}
    choice = chat(client, **settings).choices[0]
    want = [{"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls]
    content, calls, reason, deltas = streamed(client, **settings)
    assert (content, calls, reason) == (None, want, "tool_calls")
    assert deltas[0].id and deltas[0].function.name == want[0]["name"]
    assert sum(bool(d.function.arguments) for d in deltas) > 1


def test_text_without_calls_streams_as_content(parser_client):
    _, client = parser_client
    force = {"structured_outputs": {"regex": r"No call needed, <tool_ it is \[sunny\]\."}}
    choice = chat(client, extra_body=force).choices[0]
    content, calls, reason, _ = streamed(client, extra_body=force)
    assert (content, calls, reason) == (
        choice.message.content,
        [],
        "stop",
    ) and choice.message.tool_calls is None
