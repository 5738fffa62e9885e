"""Chat messages -> prompt text with the model's own chat template (jinja2, as transformers renders it).

The template comes from ``chat_template.jinja`` or tokenizer_config.json's ``chat_template`` (a string,
or a list of named templates of which "default" is used). Without one, a plain "role: content" layout
is used. Templates run in jinja2's sandbox: a checkpoint's template is untrusted code.

Templates see what transformers' ``apply_chat_template`` passes: ``messages`` (an assistant turn may carry
``tool_calls`` with null content; a tool turn its ``tool_call_id``), ``tools`` when the request has them,
and transformers' ``tojson`` (plain ``json.dumps``, not jinja2's HTML-escaping one). A tool call's
``arguments`` arrive as JSON text (OpenAI's wire format) and are handed on as an object, as vLLM does, since
templates write them with ``tojson``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from meshserve.errors import InputError, require, text

ROLES = ("system", "user", "assistant", "tool", "developer")


def read_chat_template(model_dir: Path) -> str | None:
    """The model's chat template text, or None when it has none."""
    file = model_dir / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages with role and content (a string; None on an assistant turn with tool calls); text parts
    of a content list are joined; ``tool_calls``, ``tool_call_id`` and ``name`` are kept."""
    require(isinstance(messages, list) and len(messages) > 0, "messages", "must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        require(isinstance(message, dict), f"messages[{i}]", "must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        require(role in ROLES, f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):  # OpenAI content parts: only text is supported
            require(
                all(
                    isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                    for p in content
                ),
                f"messages[{i}].content",
                "only text parts are supported",
            )
            content = "".join(p["text"] for p in content)
        calls = message.get("tool_calls")
        if content is None and role == "assistant" and calls:
            entry: dict[str, Any] = {"role": role, "content": None}
        else:
            require(
                isinstance(content, str),
                f"messages[{i}].content",
                "must be a string or a list of text parts (null only beside tool_calls)",
            )
            entry = {"role": role, "content": text(content, f"messages[{i}].content")}
        if calls is not None:
            require(role == "assistant", f"messages[{i}].tool_calls", "only assistant messages have them")
            entry["tool_calls"] = [
                _tool_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(calls)
            ]
        for key in ("tool_call_id", "name"):
            if message.get(key) is not None:
                require(isinstance(message[key], str), f"messages[{i}].{key}", "must be a string")
                entry[key] = message[key]
        out.append(entry)
    return out


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """An OpenAI tool call with its arguments parsed from JSON text into an object."""
    function = call.get("function") if isinstance(call, dict) else None
    require(
        isinstance(function, dict) and isinstance(function.get("name"), str),
        where,
        'must be {"id", "type": "function", "function": {"name", "arguments"}}',
    )
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}.function.arguments", f"is not valid JSON ({err})") from None
    return {**call, "function": {**function, "arguments": arguments}}


def render_chat(
    messages: list[dict[str, Any]],
    template: str | None,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Prompt text for ``messages`` (checked with check_messages first) and ``tools`` (OpenAI's shape)."""
    if template is None:
        lines = [f"{m['role']}: {_plain(m)}" for m in messages]
        if tools:
            lines.insert(0, "tools: " + json.dumps(tools, ensure_ascii=False))
        return "\n".join(lines) + ("\nassistant:" if add_generation_prompt else "")
    try:
        return _compile(template).render(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            **({"tools": tools} if tools else {}),
        )
    except InputError:
        raise
    except Exception as err:  # a template error is about the messages or the template, never fatal
        raise InputError("messages", f"the model's chat template failed: {err}") from None


def _plain(message: dict[str, Any]) -> str:
    """The fallback layout's text of a message: its content, then its tool calls as JSON."""
    calls = [c["function"] for c in message.get("tool_calls", [])]
    return (message["content"] or "") + (json.dumps(calls, ensure_ascii=False) if calls else "")


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys=False
) -> str:
    """transformers' tojson filter (jinja2's own escapes <, >, & and ' for HTML)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise InputError("messages", message)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = _tojson
    return env.from_string(template)
