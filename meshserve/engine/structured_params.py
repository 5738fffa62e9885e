"""StructuredOutputsParams: what a request's output must match (vLLM's names; grammar.py enforces it).

Exactly one of json (a JSON schema), json_object (any JSON object), regex, choice (one of these strings)
or grammar (EBNF, xgrammar's dialect of GBNF) is set. ``key`` is the spec as one hashable value, so equal
specs share one compiled grammar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from meshserve.errors import InputError, require

KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 1 << 18  # a schema or grammar longer than this is refused before compiling
MAX_CHOICES = 1024


@dataclass(frozen=True)
class StructuredOutputsParams:
    """json: a JSON schema (dict or its JSON text); json_object: any JSON object; regex: a regular
    expression the whole output matches; choice: the output is exactly one of these strings; grammar: an
    EBNF grammar whose ``root`` rule the output matches. disable_any_whitespace: JSON has no whitespace
    between tokens (else a bounded run of spaces / newlines is allowed there, as in vLLM)."""

    json: dict[str, Any] | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        require(
            len(given) == 1,
            "structured_outputs",
            f"set exactly one of {', '.join(KINDS)}, got {', '.join(given) or 'none'}",
        )
        require(
            self.json_object in (None, True, False), "structured_outputs.json_object", "must be true or false"
        )
        require(
            isinstance(self.disable_any_whitespace, bool),
            "structured_outputs.disable_any_whitespace",
            f"must be true or false, got {self.disable_any_whitespace!r}",
        )
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None:
                _text(value, f"structured_outputs.{name}")
        if self.choice is not None:
            require(
                isinstance(self.choice, (list, tuple))
                and 0 < len(self.choice) <= MAX_CHOICES
                and all(isinstance(c, str) and c for c in self.choice),
                "structured_outputs.choice",
                f"must be a list of 1 to {MAX_CHOICES} non-empty strings, got {self.choice!r}"[:200],
            )
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json is not None:
            object.__setattr__(self, "json", _schema_text(self.json))

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple:
        """The spec as one hashable value (a JSON schema as its canonical text)."""
        return (self.kind, getattr(self, self.kind), self.disable_any_whitespace)


def _text(value: object, name: str) -> str:
    require(isinstance(value, str) and value, name, f"must be a non-empty string, got {value!r}"[:200])
    require(len(value) <= MAX_SPEC_CHARS, name, f"at most {MAX_SPEC_CHARS} characters, got {len(value)}")
    return value


def _schema_text(schema: object) -> str:
    """A JSON schema (an object, or its text) as canonical JSON text."""
    name = "structured_outputs.json"
    if isinstance(schema, str):
        try:
            schema = json.loads(_text(schema, name))
        except json.JSONDecodeError as err:
            raise InputError(name, f"is not valid JSON ({err})") from None
    require(isinstance(schema, dict), name, f"must be a JSON schema object, got {type(schema).__name__}")
    return _text(json.dumps(schema, sort_keys=True, separators=(",", ":")), name)
