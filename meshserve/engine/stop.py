"""When a request ends: EOS, stop token ids, stop strings, max_tokens, max_model_len; and its final text.

A request that stops on a token (EOS or a stop token id) keeps that token in ``token_ids`` but not
in its text. A request that stops on a string has its text cut just before the string. Stop strings
are matched on streamed text (an incremental detokenizer), looking only at the new text plus the
few characters before it where a stop string could have started.
"""

from __future__ import annotations

from typing import Any

from meshserve.engine.request import Request, RequestStatus


class StopChecker:
    """Decides, after each new token, whether a request is done; builds its output text."""

    def __init__(self, tokenizer: Any, eos_token_ids: list[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def start(self, request: Request) -> None:
        """Prepare a new request: only stop strings and streaming (with text) need text while it runs."""
        if request.params.stop_strings or (request.stream and request.detokenize):
            request.detokenizer = self.tokenizer.detokenizer()

    def check(self, request: Request) -> RequestStatus | None:
        """Status to finish with after the request's last appended token, or None to go on."""
        token = request.token_ids[-1]
        params = request.params
        delta = request.detokenizer.add(token) if request.detokenizer is not None else ""
        if request.num_output_tokens < params.min_tokens:  # nothing but max_model_len ends it this early
            return RequestStatus.FINISHED_LENGTH if request.num_tokens >= self.max_model_len else None
        if not params.ignore_eos and token in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if delta and params.stop_strings and self._stop_string(request, delta):
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _stop_string(self, request: Request, delta: str) -> bool:
        text = request.detokenizer.text
        longest = max(len(s) for s in request.params.stop_strings)
        begin = max(0, len(text) - len(delta) - longest + 1)
        hits = [(i, s) for s in request.params.stop_strings if (i := text.find(s, begin)) >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        request.output_text = text[:index]
        request.stop_reason = stop
        return True

    def streamable_text(self, request: Request) -> str:
        """Text of a running streamed request that is safe to send: a tail that could still turn
        out to be the start of a stop string is held back."""
        text = request.detokenizer.text
        hold = max((len(s) for s in request.params.stop_strings), default=1) - 1
        return text[: len(text) - hold] if hold else text

    def final_text(self, request: Request) -> str:
        """The output text once the request has finished."""
        if isinstance(request.stop_reason, str):
            return request.output_text
        ids = request.output_token_ids
        if ids and request.status is RequestStatus.FINISHED_STOPPED:
            ids = ids[:-1]  # the EOS / stop token is not part of the text
        return self.tokenizer.decode(ids)
