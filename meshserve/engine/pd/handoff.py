"""What moves from a prefill engine to a decode engine besides the KV: a request's tokens and sampling state.

The decode engine rebuilds the request from a Handoff, gives it blocks (sharing those its prefix cache
already holds: those need not be sent), and once the KV has landed, continues it. Sampling is keyed by
(seed, output position) (draws.py), so the seed travelling with it keeps sampled tokens identical.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from meshserve.engine.engine import Engine
from meshserve.engine.request import Request
from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.timeline import Timeline


@dataclass
class Handoff:
    """A request after a token it sampled (its first on a prefill engine; any, after a role switch);
    picklable."""

    request_id: str  # the completion's own id (``child_ids``: the caller's when n = 1)
    index: int  # which of the caller's n completions: the decode side runs each as a request of its own
    prompt: str | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    seed: int
    max_tokens: int
    stream: bool
    detokenize: bool
    logprobs: list[dict[int, float]] | None
    prompt_logprobs: list[Any] | None
    arrival_time: float
    first_token_time: float | None
    timeline: Timeline
    num_computed: int  # tokens with KV: the prompt after its first token, all but the last mid-decode
    num_blocks: int  # blocks that hold that KV
    num_sent: tuple[int, int] = (0, 0)  # output tokens and characters already streamed to the caller

    @classmethod
    def of(cls, request: Request, block_size: int) -> Handoff:
        prompt = request.token_ids[: request.num_prompt_tokens]
        return cls(
            request_id=request.request_id,
            index=request.index,
            prompt=request.prompt,
            prompt_token_ids=prompt,
            output_token_ids=request.output_token_ids,
            params=request.params,
            seed=request.seed,
            max_tokens=request.max_tokens,
            stream=request.stream,
            detokenize=request.detokenize,
            logprobs=request.logprobs,
            prompt_logprobs=request.prompt_logprobs,
            arrival_time=request.arrival_time,
            first_token_time=request.first_token_time,
            timeline=copy.deepcopy(request.timeline),
            num_computed=request.num_computed_tokens,
            num_blocks=-(-request.num_computed_tokens // block_size),
            num_sent=(request.num_sent_tokens, request.num_sent_chars),
        )

    def request(self) -> Request:
        """The request as the decode engine runs it: its tokens so far, no KV yet."""
        r = Request(
            self.request_id,
            self.prompt_token_ids,
            self.params,
            self.max_tokens,
            prompt=self.prompt,
            arrival_time=self.arrival_time,
            seed=self.seed,
        )
        r.index = self.index
        r.token_ids += self.output_token_ids
        r.stream, r.detokenize = self.stream, self.detokenize
        r.logprobs, r.prompt_logprobs = copy.copy(self.logprobs), self.prompt_logprobs
        r.first_token_time, r.timeline = self.first_token_time, copy.deepcopy(self.timeline)
        r.num_sent_tokens, r.num_sent_chars = self.num_sent
        return r


def allocate(engine: Engine, handoff: Handoff) -> tuple[Request, int] | None:
    """The request with blocks for its KV, and how many leading blocks already hold it (the decode
    engine's prefix cache: those are not sent); None, with nothing held, when the blocks are not free now
    or the engine already runs ``max_num_seqs`` requests (its batch, and the draft's slots, are that big).

    Prefix keys are salted per cache (prefix_cache.py), so the two sides cannot compare keys: the decode
    side matches the token ids itself and answers with a block count."""
    scheduler = engine.scheduler
    if len(scheduler.running) >= scheduler.config.max_num_seqs:
        return None
    request = handoff.request()
    blocks = engine.blocks
    reused = blocks.match_prefix(request)  # at most num_tokens - 1 = num_computed tokens
    if not blocks.allocate(request, handoff.num_computed):
        blocks.free(request)
        return None
    blocks.record_prefix(request, reused)  # the decode side's hit rate: prompt tokens it did not receive
    return request, reused // blocks.block_size


def land(engine: Engine, request: Request) -> None:
    """The KV is in the request's blocks: the decode engine continues it from its last sampled token."""
    request.num_computed_tokens = request.num_tokens - 1
    engine.adopt(request)
