"""A caller's request as the engine tracks it: n completions (n > 1 = parallel sampling) and their outputs.

Each completion is its own ``Request`` (id ``"{index}_{parent}"`` when n > 1). With prefix caching on,
only the first is scheduled at once; the others wait until its prompt KV is in the cache and then
share those blocks (the partly filled last block is copied), so the prompt is computed once.
A streamed group reports every step's new tokens and text (deltas); the others report once, at the end.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from meshserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from meshserve.engine.request import Request
from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.stop import StopChecker

SEED_MOD = 1 << 64


def child_ids(request_id: str, n: int) -> list[str]:
    """The ids of a request's n completions: its own when n = 1."""
    return [request_id] if n == 1 else [f"{i}_{request_id}" for i in range(n)]


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Completion ``index``'s settings: n = 1, and seed + index so the n samples differ but reproduce."""
    seed = None if params.seed is None else (params.seed + index) % SEED_MOD
    return dataclasses.replace(params, n=1, seed=seed)


@dataclass
class RequestGroup:
    """The n completions of one caller request; ``held`` ones wait for the first's prompt KV."""

    request_id: str
    children: list[Request]
    stream: bool
    held: list[Request] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return not self.held and all(c.is_finished for c in self.children)

    def ready_to_release(self) -> bool:
        """The first completion has its prompt computed (it has sampled) or has ended."""
        first = self.children[0]
        return bool(self.held) and (first.num_output_tokens > 0 or first.is_finished)

    def output(self, stopper: StopChecker, delta_of: list[Request] | None = None) -> RequestOutput:
        """Cumulative output of every completion, or (``delta_of``) only what those completions added
        since the last call: new tokens, new text, new logprobs."""
        first = self.children[0]
        if delta_of is None:
            outputs = [_completion(c, stopper, delta=False) for c in self.children]
        else:
            outputs = [_completion(c, stopper, delta=True) for c in delta_of]
        times = [c.first_token_time for c in self.children if c.first_token_time is not None]
        ends = [c.finish_time for c in self.children if c.finish_time is not None]
        finished = self.finished
        return RequestOutput(
            request_id=self.request_id,
            prompt=first.prompt,
            prompt_token_ids=first.token_ids[: first.num_prompt_tokens],
            outputs=outputs,
            finished=finished,
            metrics=RequestMetrics(
                first.arrival_time,
                min(times, default=None),
                max(ends) if finished and ends else None,
                first.timeline,
            ),
            prompt_logprobs=first.prompt_logprobs,
            embedding=first.embedding,
        )


def _completion(request: Request, stopper: StopChecker, delta: bool) -> CompletionOutput:
    if not request.detokenize:
        text = ""  # the caller detokenizes (AsyncLLM's front door)
    elif request.is_finished:
        text = stopper.final_text(request)
    else:
        text = stopper.streamable_text(request)
    tokens = request.output_token_ids
    logprobs = request.logprobs
    if delta:
        sent_tokens, sent_chars = request.num_sent_tokens, request.num_sent_chars
        request.num_sent_tokens, request.num_sent_chars = len(tokens), max(len(text), sent_chars)
        text, tokens = text[sent_chars:], tokens[sent_tokens:]
        logprobs = None if logprobs is None else logprobs[sent_tokens:]
    return CompletionOutput(
        request.index, text, tokens, request.finish_reason, request.stop_reason, logprobs, request.error
    )
