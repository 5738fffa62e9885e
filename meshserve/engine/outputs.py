"""What a request returns, shaped like vLLM's: RequestOutput with one CompletionOutput and timings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meshserve.engine.timeline import Timeline


@dataclass
class CompletionOutput:
    """The generated part. stop_reason: the stop string or stop token id that ended it, if any."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    error: str | None = None  # finish_reason "error": what failed (only this request ended)


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of arrival, first generated token and finish; ``timeline``: the
    (first) completion's monotonic phase times (engine/timeline.py), shared with the engine while it runs."""

    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    timeline: Timeline | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """One request's prompt and completion; ``text`` / ``token_ids`` / ``finish_reason`` are shortcuts."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, float] | None] | None = None  # when asked for; None for position 0
    embedding: torch.Tensor | None = None  # a pooling request's float32 vector [hidden], once finished

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
