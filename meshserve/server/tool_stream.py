"""Streamed tool calls in OpenAI's delta shape, as they are generated (vLLM's streaming tool parsers).

Every chunk, the choice's text so far is read as far as it goes (``partial``): the content that is
surely content (text before the format's call marker, less a tail that could start the marker or be
the whitespace before it), and the calls begun so far, each its name once whole and its arguments'
canonical text so far (partial_json.py). What is new since the last chunk goes out: content as
``delta.content``; a call's first delta with ``index``, ``id``, ``type`` and ``function.name``; then
``function.arguments`` fragments. The last chunk reads the whole text with the same parser as the
non-streamed response (ToolPlan.calls) and sends what is left of it, so the deltas add up to the
non-streamed message; ``finish_reason`` becomes ``tool_calls`` once calls were sent.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from meshserve.server.partial_json import Memo, canonical_prefix, partial_calls, skip_space
from meshserve.server.tools import ToolPlan

Calls = list[tuple[str | None, str]]  # (name once whole, arguments' canonical text so far)
PYTHON_TAG = "<|python_tag|>"


def _before(text: str, marker: str, at: int = 0) -> tuple[str, int | None]:
    """(content surely before ``marker``, where the text after the first marker starts, or None)."""
    found = text.find(marker, at)
    if found >= 0:
        return text[:found].rstrip(), found + len(marker)
    for k in range(min(len(marker) - 1, len(text)), 0, -1):  # a tail that may be the marker's start
        if marker.startswith(text[-k:]):
            return text[:-k].rstrip(), None
    return text.rstrip(), None


def partial_hermes(text: str, memo: Memo) -> tuple[str, Calls]:
    content, at = _before(text, "<tool_call>")
    calls: Calls = []
    while at is not None:
        close = text.find("</tool_call>", at)
        body = text if close < 0 else text[:close]
        calls += partial_calls(body, at, ("arguments", "parameters"), "", memo)[:1]
        at = None if close < 0 else _before(text, "<tool_call>", close)[1]
    return content, calls


def partial_llama3_json(text: str, memo: Memo) -> tuple[str, Calls]:
    at = skip_space(text, 0)
    if text.startswith(PYTHON_TAG, at):
        at = skip_space(text, at + len(PYTHON_TAG))
    elif PYTHON_TAG.startswith(text[at:]):
        return "", []  # undecided: the tag may be coming
    if at == len(text):
        return "", []  # undecided: a call may follow
    if text.startswith("{", at):  # the whole message is calls: no content
        return "", partial_calls(text, at, ("parameters", "arguments"), ";", memo)
    return text, []


def partial_mistral(text: str, memo: Memo) -> tuple[str, Calls]:
    content, at = _before(text, "[TOOL_CALLS]")
    if at is None or not text[at:].strip():
        return content, []
    at = skip_space(text, at)
    if text.startswith("[", at):  # v3: one JSON list of {"name", "arguments"}
        return content, partial_calls(text, at + 1, ("arguments", "parameters"), ",", memo)
    calls: Calls = []
    while at is not None:  # v11+: name[ARGS]{...} per call, each after its own [TOOL_CALLS]
        args = text.find("[ARGS]", at)
        following = text.find("[TOOL_CALLS]", at)
        if args < 0 or 0 <= following < args:
            break
        name = text[at:args].strip()
        calls.append((name, canonical_prefix(text, skip_space(text, args + len("[ARGS]")), memo)[0]))
        at = None if following < 0 else following + len("[TOOL_CALLS]")
    return content, calls


PARTIAL = {"hermes": partial_hermes, "llama3_json": partial_llama3_json, "mistral": partial_mistral}


def partial(plan: ToolPlan, text: str, memo: Memo) -> tuple[str, Calls]:
    """(content so far, calls so far) of a running choice's text under ``plan``; ``memo``: the choice's
    (partial_json.py), so each call reads only the text that is new."""
    if plan.mode == "named":
        return "", [(plan.name, canonical_prefix(text, 0, memo)[0])]
    if plan.mode == "required":
        at = skip_space(text, 0)
        return "", partial_calls(text, at + 1, ("parameters",), ",", memo) if text.startswith("[", at) else []
    return PARTIAL[plan.parser](text, memo) if plan.parser else (text, [])


@dataclass
class _Sent:
    """What one choice has sent: its content and each call's arguments so far."""

    text: str = ""  # the choice's whole text so far
    content: str = ""
    arguments: list[str] = field(default_factory=list)
    memo: Memo = field(default_factory=dict)


class ToolStream:
    """Rewrites a chat stream's chunks (``chunk``) into content and tool-call deltas."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.sent: dict[int, _Sent] = {}

    def chunk(self, chunk: dict[str, Any]) -> dict[str, Any]:
        for choice in chunk["choices"]:
            sent = self.sent.setdefault(choice["index"], _Sent())
            delta = choice["delta"]
            sent.text += delta.pop("content", None) or ""
            if choice["finish_reason"] is None:
                content, calls = partial(self.plan, sent.text, sent.memo)
            else:
                final, whole = self.plan.calls(sent.text)
                calls = [(c.name, c.arguments) for c in whole]
                content = "" if final is None or (sent.arguments and not calls) else final
            if content.startswith(sent.content) and len(content) > len(sent.content):
                delta["content"] = content[len(sent.content) :]
                sent.content = content
            if deltas := self._calls(sent, calls):
                delta["tool_calls"] = deltas
            if sent.arguments and choice["finish_reason"] == "stop":
                choice["finish_reason"] = "tool_calls"
        return chunk

    def _calls(self, sent: _Sent, calls: Calls) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for index, (name, arguments) in enumerate(calls):
            if name is None:
                break  # calls are sent in order, each once its name is whole
            if index == len(sent.arguments):
                function = {"name": name, "arguments": arguments}
                call = {"index": index, "id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function"}
                deltas.append({**call, "function": function})
                sent.arguments.append(arguments)
            elif arguments.startswith(sent.arguments[index]) and len(arguments) > len(sent.arguments[index]):
                deltas.append(
                    {"index": index, "function": {"arguments": arguments[len(sent.arguments[index]) :]}}
                )
                sent.arguments[index] = arguments
        return deltas
