"""SamplingParams: how one request samples and when it stops (vLLM's names and meanings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.errors import InputError, require

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """Per-request sampling settings.

    temperature: 0 means greedy; otherwise logits are divided by it.
    top_p: keep the smallest set of tokens whose probability reaches top_p (1 = all).
    top_k: keep the k most likely tokens (0 or -1 = all).
    max_tokens: most tokens to generate; None = up to the model's max length.
    seed: a seeded request draws from its own generator, so its tokens do not depend on the batch.
    stop: strings that end generation; the output text is cut before the first one found.
    stop_token_ids: tokens that end generation (kept in token_ids, not shown in text).
    ignore_eos: keep generating after the model's EOS token.
    logprobs: return log-probabilities of the top n tokens (and the sampled one) at every step.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _number(self.temperature, "temperature")
        _number(self.top_p, "top_p")
        require(self.temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _integer(self.top_k, "top_k")
        require(self.top_k >= -1, "top_k", f"must be >= 1, or 0 / -1 to disable, got {self.top_k}")
        if self.max_tokens is not None:
            _integer(self.max_tokens, "max_tokens")
            require(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.seed is not None:
            _integer(self.seed, "seed")
        if self.logprobs is not None:
            _integer(self.logprobs, "logprobs")
            require(0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
                    f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        require(all(isinstance(s, str) and s for s in stops), "stop", "must be non-empty strings")
        self.stop_strings = stops
        ids = list(self.stop_token_ids or [])
        for i in ids:
            _integer(i, "stop_token_ids")
        require(all(i >= 0 for i in ids), "stop_token_ids", "must be non-negative token ids")
        self.stop_token_ids = ids

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _number(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InputError(name, f"must be a number, got {value!r}")


def _integer(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(name, f"must be an integer, got {value!r}")
