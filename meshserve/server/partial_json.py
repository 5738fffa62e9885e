"""JSON that is still being generated: what its text so far fixes of the final value.

Tool-call arguments stream as fragments of ``json.dumps(arguments, ensure_ascii=False)`` (the form the
whole calls carry, tool_parsers.call_from), whatever spacing the model writes. ``canonical_prefix``
re-writes the raw text token by token (``, `` and ``: `` separators, strings re-escaped, numbers as
Python prints them) and stops where the raw text could still go on: inside a number or literal, before
an escape or a surrogate pair is whole. So each call's output is a prefix of the next call's, and of
the final value's. (Duplicate keys are the exception: ``json.loads`` keeps one, the stream shows both.)

The text only grows while it streams, so the functions take positions in the whole text and a ``memo``
(one dict per stream) where each value remembers how far it was read: every call reads only what is new.
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


# a value's start -> (read up to, its canonical text so far, depth there, whether the value is whole)
Memo = dict[int, tuple[int, str, int, bool]]


def canonical_prefix(raw: str, start: int = 0, memo: Memo | None = None) -> tuple[str, int | None]:
    """(the canonical text that ``raw[start:]``, the start of one JSON value, already fixes; where the
    value ends in ``raw``, or None while it is open). Text that is not JSON ends the prefix there."""
    at, done, depth, whole = (memo or {}).get(start, (start, "", 0, False))
    if whole:
        return done, at
    out = [done]
    while True:
        m = _TOKEN.match(raw, at)
        number = m is not None and m.lastgroup == "number"
        if m is None or (number and (m.end() == len(raw) or raw[m.end()] not in _AFTER_NUMBER)):
            # open: "12" or "1." may go on (only a delimiter ends a number), a string is still being written
            done = "".join(out)
            if memo is not None:
                memo[start] = (at, done, depth, False)
            return done + _open_string(raw, at), None
        token = m.group(m.lastgroup)
        if m.lastgroup == "punct":
            out.append(_PUNCT.get(token, token))
            depth += 1 if token in "{[" else -1 if token in "}]" else 0
        else:
            out.append(json.dumps(json.loads(token), ensure_ascii=False))
        at = m.end()
        if depth <= 0 and token not in ",:":
            done = "".join(out)
            if memo is not None:
                memo[start] = (at, done, depth, True)
            return done, at


def _open_string(raw: str, at: int) -> str:
    """The canonical text of the whole characters of a string still being written at ``at`` ("" if none)."""
    at = skip_space(raw, at)
    if not raw.startswith('"', at):
        return ""
    body = _HIGH_SURROGATE.sub("", _STRING_BODY.match(raw, at + 1).group())
    return json.dumps(json.loads(f'"{body}"'), ensure_ascii=False)[:-1]


def skip_space(raw: str, at: int, also: str = "") -> int:
    while at < len(raw) and (raw[at].isspace() or raw[at] in also):
        at += 1
    return at


def partial_call(
    raw: str, at: int, keys: tuple[str, ...], memo: Memo | None = None
) -> tuple[str | None, str, int | None]:
    """Of the ``{"name": ..., <key>: {...}}`` object starting at ``at``: (the name once its string is
    whole, the arguments' canonical text so far, where the object ends in ``raw`` or None while open).
    Arguments written as a JSON string (some models do) come whole with the final parse, not here."""
    at = skip_space(raw, at)
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
        text, end = canonical_prefix(raw, start, memo)
        label = json.loads(key.group("string"))
        if label == "name" and end is not None and text.startswith('"'):
            name = json.loads(text)
        elif label in keys and not raw.startswith('"', start):
            arguments = text
        if end is None:
            return name, arguments, None
        after = _TOKEN.match(raw, end)
        if after is None or after.group("punct") not in (",", "}"):
            return name, arguments, None
        if after.group("punct") == "}":
            return name, arguments, after.end()
        at = after.end()


def partial_calls(
    raw: str, at: int, keys: tuple[str, ...], separators: str, memo: Memo | None = None
) -> list[tuple[str | None, str]]:
    """(name, arguments so far) of the call objects ``raw`` holds from ``at`` on, one after another,
    between ``separators`` (``,`` inside a JSON list, ``;`` between Llama 3's calls) and whitespace."""
    calls: list[tuple[str | None, str]] = []
    at = skip_space(raw, at, separators)
    while raw.startswith("{", at):
        name, arguments, end = partial_call(raw, at, keys, memo)
        calls.append((name, arguments))
        if end is None:
            break
        at = skip_space(raw, end, separators)
    return calls
