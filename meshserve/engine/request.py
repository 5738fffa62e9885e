"""A request and its state machine.

    NEW --queue--> WAITING --schedule--> RUNNING --stop / length--> FINISHED_STOPPED / FINISHED_LENGTH
                      ^                     |
                      +----preempt----------+        (any unfinished state) --abort--> FINISHED_ABORTED
                                                     (running, its sampling fails) --> FINISHED_ERROR
                                  (a prefill engine, first token sampled) --> HANDED_OFF (its blocks stay
                                   held until its KV has moved to a decode engine: engine/pd/)

NEW: made but not queued (an n > 1 completion held until its sibling's prompt KV is cached).

The request's tokens are ``token_ids`` (prompt then outputs); ``num_computed_tokens`` of them have
their K/V in the paged cache. Whatever remains is this request's pending work: a prompt (prefill,
possibly in chunks), one sampled token (decode), or that token plus draft tokens (verify).
Preemption by recompute drops the KV and sets ``num_computed_tokens`` back to 0; outputs are kept.
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import Any

from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.timeline import Timeline, now

_arrivals = itertools.count()


class RequestStatus(enum.Enum):
    NEW = "new"
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # its own parameters failed in a step; the others in the batch go on
    HANDED_OFF = "handoff"  # done here (a prefill engine): a decode engine continues it

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.NEW, RequestStatus.WAITING, RequestStatus.RUNNING)


class Request:
    """One generation request: tokens, KV progress, block table, sampling state and timings."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        prompt: str | None = None,
        arrival_time: float | None = None,
        seed: int | None = None,
        arrival: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.parent_id = request_id  # the id the caller knows; differs for the n > 1 children
        self.index = 0  # which of the parent's n completions this is
        self.stream = False  # report new tokens / text every step, not only at the end
        self.num_sent_tokens = 0  # output tokens and text characters already streamed
        self.num_sent_chars = 0
        self.prompt = prompt
        self.params = params
        self.error: str | None = None  # why it ended FINISHED_ERROR
        self.max_tokens = max_tokens  # resolved: params.max_tokens capped by max_model_len
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.spec_token_ids: list[int] = []  # draft tokens proposed for the next verify step
        self.block_keys: list[bytes] = []  # prefix-cache chain keys of its leading full blocks (APC)
        self.matcher: Any = None  # its grammar's state when it has structured_outputs (grammar.py)
        self.status = RequestStatus.NEW  # the scheduler's add makes it WAITING
        self.arrival_order = next(_arrivals)  # FCFS priority; preemption picks the largest
        self.num_preemptions = 0
        # Keys the request's random draws (draws.py); the engine gives an unseeded request one of its own.
        self.seed = params.seed if seed is None else seed
        self.logprobs: list[dict[int, float]] | None = None if params.logprobs is None else []
        # position 0 has nothing before it; entries are added as prompt chunks are computed
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            None if params.prompt_logprobs is None else [None]
        )
        self.text: Any = None  # its text as tokens arrive (stop.StopStrings), when the engine makes text
        self.detokenize = True  # False: outputs carry token ids only, the caller makes the text
        self.stop_reason: int | str | None = None
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        # monotonic phase times (timeline.py); ``arrival``: when the caller took the request, if earlier
        self.timeline = Timeline(num_prompt_tokens=self.num_prompt_tokens)
        if arrival is not None:
            self.timeline.arrival = arrival
        # A pooling request (pooling.py) runs its prompt only: its fold so far, then the embedding.
        self.pooling: Any = None
        self.pooled: Any = None
        self.embedding: Any = None

    @property
    def needs_whole_prompt(self) -> bool:
        """Computes its whole prompt (prompt logprobs, pooling): takes no cached prefix blocks."""
        return self.prompt_logprobs is not None or self.pooling is not None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def query_tokens(self, start: int, n: int) -> list[int]:
        """Tokens ``start .. start+n`` of the known tokens followed by the draft tokens."""
        end = start + n
        if end <= len(self.token_ids):
            return self.token_ids[start:end]
        return self.token_ids[start:] + self.spec_token_ids[: end - len(self.token_ids)]

    def append_token(
        self, token_id: int, logprobs: dict[int, float] | None = None, at: float | None = None
    ) -> None:
        """Record one sampled token (and its top logprobs when asked for); ``at``: the monotonic time its
        step ended (default: now)."""
        if self.first_token_time is None:
            self.first_token_time = time.time()
        self.timeline.token_times.append(now() if at is None else at)
        self.token_ids.append(token_id)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
