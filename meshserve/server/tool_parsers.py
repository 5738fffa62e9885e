"""Tool-call parsers: a model's text -> (content, tool calls), one per format (``--tool-call-parser``).

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number (Qwen, Hermes);
- ``llama3_json``: ``{"name": ..., "parameters": {...}}`` objects (optionally after ``<|python_tag|>``),
  separated by ``;``, making up the whole message (Llama 3.x);
- ``mistral``: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` (v3 tokenizers) or
  ``name[ARGS]{...}`` per call (v11+).

A parser never fails: text that does not hold a well-formed call is content. Arguments come back as JSON
text, as the OpenAI API carries them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object


Parsed = tuple[str | None, list[ToolCall]]  # (content left over, or None; the calls)

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def call_from(value: Any, arguments_key: str = "arguments") -> ToolCall | None:
    """A ToolCall from a parsed ``{"name": str, arguments_key: object}`` (None when it is not one)."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(value["name"], json.dumps(args, ensure_ascii=False))


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _content(text: str) -> str | None:
    return text.strip() or None


def parse_hermes(text: str) -> Parsed:
    if "<tool_call>" not in text:
        return text, []
    calls = [c for m in _HERMES.finditer(text) if (c := call_from(_loads(m.group(1)))) is not None]
    if not calls:
        return text, []
    return _content(_HERMES.sub("", text)), calls


def parse_llama3_json(text: str) -> Parsed:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            value, end = decoder.raw_decode(body, at)
        except json.JSONDecodeError:
            return text, []
        call = call_from(value, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        at = end
        while at < len(body) and body[at] in " \t\r\n;":
            at += 1
    return None, calls


def parse_mistral(text: str) -> Parsed:
    if "[TOOL_CALLS]" not in text:
        return text, []
    content, _, rest = text.partition("[TOOL_CALLS]")
    rest = rest.strip()
    if "[ARGS]" in rest:  # v11+: name[ARGS]{...} per call, each after its own [TOOL_CALLS]
        calls = []
        for part in rest.split("[TOOL_CALLS]"):
            name, _, args = part.partition("[ARGS]")
            call = call_from({"name": name.strip(), "arguments": _loads(args.strip())})
            if call is None:
                return text, []
            calls.append(call)
        return _content(content), calls
    value = _loads(rest)
    items = value if isinstance(value, list) else [value]
    calls = [call_from(v) for v in items]
    if not calls or any(c is None for c in calls):
        return text, []
    return _content(content), [c for c in calls if c is not None]


PARSERS: dict[str, Callable[[str], Parsed]] = {
    "hermes": parse_hermes,
    "llama3_json": parse_llama3_json,
    "mistral": parse_mistral,
}
