"""Tools in chat templates: tools, assistant tool calls (null content, arguments as JSON text) and tool
results reach the template as transformers' apply_chat_template passes them (a Qwen 2.5-style template)."""

from __future__ import annotations

import json

import pytest

from meshserve.errors import InputError
from meshserve.models.loader import load_model

TEMPLATE = """{%- if tools %}<|im_start|>system
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}\
{%- set tool_call = tool_call.function %}{%- endif %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather where temp < 40 & the city is known",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
ARGS = {"city": "Zürich"}


def conversation(arguments: object) -> list[dict]:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "there?"}],
        },
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    tok = load_model(tiny_model_dir("llama")).tokenizer
    tok.chat_template = TEMPLATE
    return tok


def test_tools_and_tool_messages_render_like_transformers(tiny_model_dir, tokenizer):
    from transformers import PreTrainedTokenizerFast

    theirs = PreTrainedTokenizerFast(
        tokenizer_file=str(tiny_model_dir("llama") / "tokenizer.json"), chat_template=TEMPLATE
    )
    hf_chat = conversation(ARGS)  # transformers' documented form: arguments as an object, text as a string
    hf_chat[0]["content"] = "Weather there?"
    expected = theirs.apply_chat_template(hf_chat, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "temp < 40 & the" in expected and '"arguments": {"city": "Zürich"}' in expected
    # OpenAI's wire form: arguments as JSON text, content as text parts
    ours = tokenizer.apply_chat_template(conversation(json.dumps(ARGS)), tools=TOOLS)
    assert ours == tokenizer.encode(expected, add_special_tokens=False, field="messages")


def test_bad_tool_messages_name_the_field(tokenizer):
    for chat, field in [
        (conversation("{not json"), "messages[1].tool_calls[0].function.arguments"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
        ([{"role": "tool", "content": "x", "tool_call_id": 3}], "messages[0].tool_call_id"),
    ]:
        with pytest.raises(InputError) as err:
            tokenizer.apply_chat_template(chat)
        assert err.value.field == field


def test_llm_chat_passes_tools_to_the_template(tiny_model_dir, tokenizer):
    from meshserve import LLM, SamplingParams

    llm = LLM(str(tiny_model_dir("llama")), max_model_len=1024)
    llm.tokenizer.chat_template = TEMPLATE
    params = SamplingParams(temperature=0, max_tokens=2)
    (out,) = llm.chat(conversation(json.dumps(ARGS)), params, use_tqdm=False, tools=TOOLS)
    assert out.prompt_token_ids == tokenizer.apply_chat_template(conversation(json.dumps(ARGS)), tools=TOOLS)
    assert "<tools>" in tokenizer.decode(out.prompt_token_ids)
