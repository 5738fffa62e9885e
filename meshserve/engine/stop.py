"""When a request ends: EOS, stop token ids, stop strings, max_tokens, max_model_len; and its final text.

A request that stops on a token (EOS or a stop token id) keeps that token in ``token_ids`` but not
in its text. A request that stops on a string has its text cut just before the string (after it with
``include_stop_str_in_output``). Stop strings are matched on streamed text (an incremental
detokenizer), looking only at the new text plus the few characters before it where a stop string could
have started. ``StopStrings`` is that matching; the engine runs it for callers that want text from it
(``LLM.generate``), AsyncLLM's front door runs the same code off the engine thread (front_door.py).
"""

from __future__ import annotations

from typing import Any

from meshserve.engine.request import Request, RequestStatus
from meshserve.engine.sampling_params import SamplingParams


class StopStrings:
    """One completion's text as its tokens arrive, and the stop string that ends it, if one does."""

    def __init__(self, tokenizer: Any, params: SamplingParams) -> None:
        self.detokenizer = tokenizer.detokenizer()
        self.stops = params.stop_strings
        self.min_tokens = params.min_tokens
        self.include = params.include_stop_str_in_output
        self.longest = max(map(len, self.stops), default=0)
        # a running stream holds back a tail that could still turn out to be the start of a stop string
        self.hold = self.longest - 1 if self.stops and not self.include else 0
        self.stop: str | None = None  # the stop string found
        self._cut: int | None = None  # the text's length once a stop string was found

    @property
    def ids(self) -> list[int]:
        return self.detokenizer.ids

    @property
    def text(self) -> str:
        """All text so far; once stopped, cut at (or after) the stop string."""
        return self.detokenizer.text[: self._cut]

    def streamable(self) -> str:
        """Text of a running completion that is safe to send."""
        text = self.detokenizer.text
        return text[: len(text) - self.hold] if self.hold and self._cut is None else self.text

    def add(self, token_id: int) -> str:
        """Append one output token; returns the new text (may be empty)."""
        return self.detokenizer.add(token_id)

    def match(self, delta: str) -> bool:
        """Whether the token that added ``delta`` completed a stop string (then the text is cut there).
        Not before min_tokens tokens: a stop string completed earlier is never matched later."""
        if not delta or not self.stops or len(self.detokenizer.ids) < self.min_tokens:
            return False
        text = self.detokenizer.text
        begin = max(0, len(text) - len(delta) - self.longest + 1)
        hits = [(i, s) for s in self.stops if (i := text.find(s, begin)) >= 0]
        if not hits:
            return False
        index, self.stop = min(hits)
        self._cut = index + len(self.stop) if self.include else index
        return True


class StopChecker:
    """Decides, after each new token, whether a request is done; builds its output text."""

    def __init__(self, tokenizer: Any, eos_token_ids: list[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def start(self, request: Request) -> None:
        """Prepare a new request: it needs text while it runs only when the engine makes its text (not
        AsyncLLM's requests) and it has stop strings or streams."""
        if request.detokenize and (request.params.stop_strings or request.stream):
            request.text = StopStrings(self.tokenizer, request.params)

    def check(self, request: Request) -> RequestStatus | None:
        """Status to finish with after the request's last appended token, or None to go on."""
        token = request.token_ids[-1]
        params = request.params
        delta = request.text.add(token) if request.text is not None else ""
        if request.num_output_tokens < params.min_tokens:  # nothing but max_model_len ends it this early
            return RequestStatus.FINISHED_LENGTH if request.num_tokens >= self.max_model_len else None
        if not params.ignore_eos and token in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if request.text is not None and request.text.match(delta):
            request.stop_reason = request.text.stop
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def streamable_text(self, request: Request) -> str:
        """Text of a running request that is safe to send ("" when the engine makes none for it)."""
        return "" if request.text is None else request.text.streamable()

    def final_text(self, request: Request) -> str:
        """The output text once the request has finished."""
        return final_text(self.tokenizer, request.output_token_ids, request.status.value, request.text)


def final_text(tokenizer: Any, ids: list[int], finish_reason: str, text: StopStrings | None) -> str:
    """A finished completion's text: cut at its stop string, else the whole decode less the EOS / stop
    token that ended it."""
    if text is not None and text.stop is not None:
        return text.text
    if ids and finish_reason == RequestStatus.FINISHED_STOPPED.value:
        ids = ids[:-1]  # the EOS / stop token is not part of the text
    return tokenizer.decode(ids)
