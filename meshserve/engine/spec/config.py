"""``speculative_config`` with vLLM's vocabulary, validated into a dataclass."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from meshserve.errors import InputError, require

METHODS = ("ngram", "draft_model", "mtp")
MAX_SPECULATIVE_TOKENS = 16
FIELD = "speculative_config"
DEFAULT_DISABLE_BY_BATCH_SIZE = 4  # benchmarks/spec.py: speculation loses from batch 16 on (docs/engine.md)


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding settings.

    method: "ngram" (prompt lookup in the request's own tokens), "draft_model" (a smaller model with the
        same tokenizer, run on its own contiguous KV) or "mtp" (the target's own multi-token-prediction
        layer, DeepSeek-V3's, fed the target's hidden states).
    num_speculative_tokens: drafts proposed per request per step (k); a verify item is k + 1 tokens.
    prompt_lookup_max / prompt_lookup_min: n-gram lengths tried, longest first (ngram only).
    model: draft model directory (draft_model only).
    disable_by_batch_size: no drafts in a step with more than this many running requests (vLLM's setting;
        None = always speculate). A big batch already fills the forward that speculation would fill, so
        extra verify tokens and draft forwards cost more than the steps they save (docs/engine.md).
    draft_confidence: draft_model only: a request stops drafting at the first token the draft gives less than
        this probability (None = always k drafts). Fewer likely-rejected drafts to verify; outputs unchanged.
    """

    method: str
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None
    disable_by_batch_size: int | None = DEFAULT_DISABLE_BY_BATCH_SIZE
    draft_confidence: float | None = None

    @classmethod
    def from_dict(cls, value: dict[str, Any] | SpecConfig | None) -> SpecConfig | None:
        """Validate a user's ``speculative_config`` dict (None = speculation off)."""
        if value is None or isinstance(value, SpecConfig):
            return value
        require(
            isinstance(value, dict), FIELD, f"must be a dict like {{'method': 'ngram', ...}}, got {value!r}"
        )
        known = {f.name for f in fields(cls)}
        for name in value:
            if name not in known:
                raise InputError(f"{FIELD}.{name}", f"unknown setting; allowed: {', '.join(sorted(known))}")
        require("method" in value, f"{FIELD}.method", f"is required; allowed: {', '.join(METHODS)}")
        return cls(**value)

    def __post_init__(self) -> None:
        require(
            self.method in METHODS,
            f"{FIELD}.method",
            f"unknown method {self.method!r}; allowed: {', '.join(METHODS)}",
        )
        for name, low in (("num_speculative_tokens", 1), ("prompt_lookup_max", 1), ("prompt_lookup_min", 1)):
            v = getattr(self, name)
            require(
                isinstance(v, int) and not isinstance(v, bool) and v >= low,
                f"{FIELD}.{name}",
                f"must be an integer >= {low}, got {v!r}",
            )
        v = self.disable_by_batch_size
        require(
            v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
            f"{FIELD}.disable_by_batch_size",
            f"must be None or an integer >= 1, got {v!r}",
        )
        require(
            self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS,
            f"{FIELD}.num_speculative_tokens",
            f"must be <= {MAX_SPECULATIVE_TOKENS}, got {self.num_speculative_tokens}",
        )
        require(
            self.prompt_lookup_min <= self.prompt_lookup_max,
            f"{FIELD}.prompt_lookup_min",
            f"must be <= prompt_lookup_max ({self.prompt_lookup_max}), got {self.prompt_lookup_min}",
        )
        c = self.draft_confidence
        require(
            c is None or (isinstance(c, int | float) and not isinstance(c, bool) and 0 < c < 1),
            f"{FIELD}.draft_confidence",
            f"must be None or a probability in (0, 1), got {c!r}",
        )
        if self.method == "draft_model":
            require(
                isinstance(self.model, str) and bool(self.model),
                f"{FIELD}.model",
                "method 'draft_model' needs the draft model directory",
            )
        else:
            require(self.model is None, f"{FIELD}.model", "only method 'draft_model' takes a model")
            require(c is None, f"{FIELD}.draft_confidence", "only method 'draft_model' takes a confidence")
