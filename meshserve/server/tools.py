"""Tool calling for /v1/chat/completions: what the template sees, what the grammar forces, what comes back.

``tool_choice`` (OpenAI's meanings, vLLM's mechanics):
- ``none``: the template gets no tools and the text is content;
- ``auto`` (the default with tools): the model may call tools in its own format, which the server's
  ``--tool-call-parser`` reads from the text (without a parser, ``auto`` is refused);
- ``required``: the grammar forces a JSON list of ``{"name", "parameters"}`` calls of the given tools
  (one call when ``parallel_tool_calls`` is false), so the arguments always parse;
- ``{"type": "function", "function": {"name": ...}}``: the grammar forces that function's parameters
  object, which becomes the one call's arguments.
Calls come back as ``message.tool_calls`` with ``finish_reason: "tool_calls"``; a stream sends them in
OpenAI's delta shape as they are generated (tool_stream.py).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from meshserve.engine.structured_params import StructuredOutputsParams
from meshserve.errors import InputError, require
from meshserve.server.tool_parsers import PARSERS, ToolCall, call_from

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ToolPlan:
    """One request's tool handling: ``mode`` is none / auto / required / named."""

    mode: str
    tools: list[dict[str, Any]] | None  # passed to the chat template (None: no tools)
    structured: StructuredOutputsParams | None = None
    name: str | None = None  # the named function
    parser: str | None = None

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished choice's text."""
        if self.mode == "named":
            call = call_from({"name": self.name, "arguments": _loads(text)})
            return (text, []) if call is None else (None, [call])
        if self.mode == "required":
            value = _loads(text)
            calls = [call_from(v, "parameters") for v in value] if isinstance(value, list) else [None]
            if not calls or None in calls:
                return text, []
            return None, [c for c in calls if c is not None]
        return PARSERS[self.parser](text) if self.parser else (text, [])


def plan_tools(
    tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool, parser: str | None
) -> ToolPlan:
    """The plan for a request's tools / tool_choice (pydantic models or plain dicts)."""
    specs = [_dump(t) for t in tools or []]
    choice = _dump(tool_choice) if tool_choice is not None else ("auto" if specs else "none")
    if choice == "none" or not specs:
        require(choice in ("none", "auto"), "tool_choice", f"needs tools, got {choice!r}")
        return ToolPlan("none", None)
    functions = {t["function"]["name"]: t["function"] for t in specs}
    if choice == "auto":
        require(
            parser is not None,
            "tool_choice",
            "'auto' needs a server started with --tool-call-parser (hermes, llama3_json, mistral); "
            "use 'required', a named function or 'none'",
        )
        return ToolPlan("auto", specs, parser=parser)
    if choice == "required":
        item = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [name]},
                        "parameters": f.get("parameters") or ANY_OBJECT,
                    },
                    "required": ["name", "parameters"],
                }
                for name, f in functions.items()
            ]
        }
        schema = {"type": "array", "items": item, "minItems": 1}
        if not parallel_tool_calls:
            schema["maxItems"] = 1
        return ToolPlan("required", specs, _schema(schema))
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    require(
        name in functions,
        "tool_choice",
        f"names function {name!r}, which is not in tools ({', '.join(functions)})",
    )
    return ToolPlan("named", specs, _schema(functions[name].get("parameters") or ANY_OBJECT), name)


def message_with_calls(choice: dict[str, Any], plan: ToolPlan) -> dict[str, Any]:
    """A final chat choice with its text turned into tool calls where it holds them."""
    if not plan.active:
        return choice
    content, calls = plan.calls(choice["message"]["content"])
    if calls:
        choice["message"] = {"role": "assistant", "content": content, "tool_calls": _openai(calls)}
        if choice["finish_reason"] == "stop":
            choice["finish_reason"] = "tool_calls"
    return choice


def _openai(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {
            "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for c in calls
    ]


def _schema(schema: dict[str, Any]) -> StructuredOutputsParams:
    """Compact JSON: calls are read by programs, and whitespace only costs tokens."""
    try:
        return StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    except InputError as err:
        raise InputError("tools", err.message) from None


def _dump(value: Any) -> Any:
    return value.model_dump(by_alias=True, exclude_none=True) if hasattr(value, "model_dump") else value


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
