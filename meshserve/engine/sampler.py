"""Sampling the next token from a batch of logits rows: greedy, temperature, min-p, top-k, top-p, logprobs.

One row per sampling request. Everything is done on the whole batch at once except drawing the
random numbers: a seeded request draws its one uniform number from its own ``torch.Generator``, so
its tokens do not depend on what else is in the batch. The token is picked by inverting the CDF of
the filtered distribution at that number (``searchsorted``), which needs one draw per row, not
one per vocabulary entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meshserve.engine.sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    """Sampled token per row, and per row the top logprobs (None where the request did not ask)."""

    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


class Sampler:
    """Samples one token per row. Unseeded rows share the engine's generator (seeded by ``seed``)."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> SamplerOutput:
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            index = torch.tensor(rows)
            picked = self._sample(logits[index], [params[i] for i in rows], [generators[i] for i in rows])
            tokens[index] = picked
        token_list = tokens.tolist()
        return SamplerOutput(token_list, self._logprobs(logits, params, token_list))

    def _sample(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        probs, order = _distribution(logits, params)
        cdf = probs.cumsum(dim=-1)
        total = cdf[:, -1]
        if not bool((total.isfinite() & (total > 0)).all()):  # the engine fails only such rows' requests
            raise FloatingPointError("the sampling distribution is NaN, infinite or empty")
        u = self._uniforms(generators) * cdf[:, -1]
        choice = torch.searchsorted(cdf, u.unsqueeze(1), right=True).squeeze(1)
        # Never step past the last token with probability: rounding can leave u just above the cdf.
        last = (probs > 0).long().cumsum(dim=-1).argmax(dim=-1)
        return order.gather(1, torch.minimum(choice, last).unsqueeze(1)).squeeze(1)

    @staticmethod
    def probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """The distribution each row samples from (temperature, min-p, top-k, top-p applied), in
        vocabulary order: what speculative decoding's rejection sampling compares drafts against.
        Greedy rows get the plain softmax (their token is the argmax either way)."""
        probs, order = _distribution(logits.float(), params)
        return torch.zeros_like(probs).scatter_(1, order, probs)

    def _uniforms(self, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One number in [0, 1) per row: from the row's own generator when seeded, else the shared one."""
        u = torch.rand(len(generators), generator=self.generator)
        for i, gen in enumerate(generators):
            if gen is not None:
                u[i] = torch.rand(1, generator=gen)[0]
        return u

    def _logprobs(
        self, logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]
    ) -> list[dict[int, float] | None]:
        """Top-n logprobs of the model's distribution (before temperature), plus the sampled token."""
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        result: list[dict[int, float] | None] = [None] * len(params)
        if not wanted:
            return result
        index = torch.tensor(wanted)
        logp = logits[index].log_softmax(dim=-1)
        n = max(params[i].logprobs for i in wanted)
        top_vals, top_ids = logp.topk(max(n, 1), dim=-1)
        chosen = logp.gather(1, torch.tensor([tokens[i] for i in wanted]).unsqueeze(1)).squeeze(1).tolist()
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        for j, i in enumerate(wanted):
            k = params[i].logprobs
            entry = dict(zip(top_ids[j][:k], top_vals[j][:k], strict=True))
            entry[tokens[i]] = chosen[j]
            result[i] = entry
        return result


def _distribution(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's filtered probabilities (unnormalised is fine for sampling) and the token order they are
    listed in. Rows with top-k / top-p are sorted descending; the others stay in vocabulary order. The
    choice is made per row, so a row's numbers never depend on what its neighbours asked for."""
    temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params]).unsqueeze(1)
    logits = logits / temperature
    vocab = logits.shape[1]
    probs = logits.softmax(dim=-1)
    min_p = torch.tensor([p.min_p for p in params]).unsqueeze(1)
    probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    order = torch.arange(vocab).expand(len(params), vocab).clone()
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params]).clamp(max=vocab)
    top_p = torch.tensor([p.top_p for p in params])
    rows = torch.nonzero((top_k < vocab) | (top_p < 1)).flatten()
    if len(rows):
        sorted_probs, sorted_order = probs[rows].sort(dim=-1, descending=True)
        rank = torch.arange(vocab).unsqueeze(0)
        drop = rank >= top_k[rows].unsqueeze(1)
        share = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop |= (share.cumsum(dim=-1) - share) >= top_p[rows].unsqueeze(1)
        drop[:, 0] = False  # a top_p that rounds to 0 in float32 (5e-324) must not empty the row
        probs[rows] = sorted_probs.masked_fill(drop, 0.0)
        order[rows] = sorted_order
    return probs, order
