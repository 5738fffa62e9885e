"""JSON that is still being generated: what its text so far fixes of the final value.

Tool-call arguments stream as fragments of ``json.dumps(arguments, ensure_ascii=False)`` (the form the
whole calls carry, tool_parsers.call_from), whatever spacing the model writes. ``canonical_prefix``
re-writes the raw text token by token (``, `` and ``: `` separators, strings re-escaped, numbers as
Python prints them) and stops where the raw text could still go on: inside a number or literal, before
an escape or a surrogate pair is whole. So each call's output is a prefix of the next call's, and of
the final value's. (Duplicate keys are the exception: ``json.loads`` keeps one, the stream shows both.)
"""

from __future__ import annotations

import json
import re

_STRING = r'"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"'
_TOKEN = re.compile(
    r"\s*(?:(?P<punct>[{}\[\],:])|(?P<string>" + _STRING + r")|"
    r"(?P<number>-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?)|(?P<literal>true|false|null))"
)
_STRING_BODY = re.compile(r'(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*')
_HIGH_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}$")  # its pair may be next
_PUNCT = {",": ", ", ":": ": "}
_AFTER_NUMBER = " \t\r\n,]}"


def canonical_prefix(raw: str) -> tuple[str, int | None]:
    """(the canonical text that ``raw``, the start of one JSON value, already fixes; where the value ends
    in ``raw``, or None while it is open). Text that is not JSON ends the prefix where it starts."""
    out: list[str] = []
    at, depth = 0, 0
    while True:
        m = _TOKEN.match(raw, at)
        if m is None:
            rest = raw[at:].lstrip()
            if rest.startswith('"'):  # a string still being written: its whole characters so far
                body = _HIGH_SURROGATE.sub("", _STRING_BODY.match(rest, 1).group())
                out.append(json.dumps(json.loads(f'"{body}"'), ensure_ascii=False)[:-1])
            return "".join(out), None
        kind = m.lastgroup
        token = m.group(kind)
        if kind == "number" and (m.end() == len(raw) or raw[m.end()] not in _AFTER_NUMBER):
            return "".join(out), None  # "12" or "1." may go on: only a delimiter ends a number
        if kind == "punct":
            out.append(_PUNCT.get(token, token))
            depth += 1 if token in "{[" else -1 if token in "}]" else 0
        else:
            out.append(json.dumps(json.loads(token), ensure_ascii=False))
        at = m.end()
        if depth <= 0 and token not in ",:":
            return "".join(out), at


def skip_space(raw: str, at: int, also: str = "") -> int:
    while at < len(raw) and (raw[at].isspace() or raw[at] in also):
        at += 1
    return at


def partial_call(raw: str, keys: tuple[str, ...]) -> tuple[str | None, str, int | None]:
    """Of ``raw``, the start of a ``{"name": ..., <key>: {...}}`` object: (the name once its string is
    whole, the arguments' canonical text so far, where the object ends in ``raw`` or None while open).
    Arguments written as a JSON string (some models do) come whole with the final parse, not here."""
    at = skip_space(raw, 0)
    if not raw.startswith("{", at):
        return None, "", None
    name, arguments, at = None, "", at + 1
    while True:
        key = _TOKEN.match(raw, at)
        if key is None or key.lastgroup != "string":  # "}" ends it; an open key waits
            end = key.end() if key is not None and key.group("punct") == "}" else None
            return name, arguments, end
        colon = _TOKEN.match(raw, key.end())
        if colon is None or colon.group("punct") != ":":
            return name, arguments, None
        start = skip_space(raw, colon.end())
        text, end = canonical_prefix(raw[start:])
        label = json.loads(key.group("string"))
        if label == "name" and end is not None and text.startswith('"'):
            name = json.loads(text)
        elif label in keys and not raw.startswith('"', start):
            arguments = text
        if end is None:
            return name, arguments, None
        after = _TOKEN.match(raw, start + end)
        if after is None or after.group("punct") not in (",", "}"):
            return name, arguments, None
        if after.group("punct") == "}":
            return name, arguments, after.end()
        at = after.end()


def partial_calls(raw: str, keys: tuple[str, ...], separators: str) -> list[tuple[str | None, str]]:
    """(name, arguments so far) of the call objects ``raw`` holds one after another, between
    ``separators`` (e.g. ``,`` inside a JSON list, ``;`` between Llama 3's calls) and whitespace."""
    calls: list[tuple[str | None, str]] = []
    at = skip_space(raw, 0, separators)
    while raw.startswith("{", at):
        name, arguments, end = partial_call(raw[at:], keys)
        calls.append((name, arguments))
        if end is None:
            break
        at = skip_space(raw, at + end, separators)
    return calls
