"""Sampling the next token from a batch of logits rows: greedy, temperature, top-k, top-p, logprobs.

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
        vocab = logits.shape[1]
        logits, order, drop = _filter(logits, params)
        cdf = logits.softmax(dim=-1).cumsum(dim=-1)
        u = self._uniforms(generators) * cdf[:, -1]
        choice = torch.searchsorted(cdf, u.unsqueeze(1), right=True).squeeze(1)
        if order is not None:
            kept = (~drop).sum(dim=-1)
            choice = torch.minimum(choice, kept - 1)
            return order.gather(1, choice.unsqueeze(1)).squeeze(1)
        return choice.clamp(max=vocab - 1)

    @staticmethod
    def probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """The distribution each row samples from (temperature, top-k, top-p applied), in vocabulary
        order: what speculative decoding's rejection sampling compares drafts against. Greedy rows get
        the plain softmax (their token is the argmax either way)."""
        filtered, order, _ = _filter(logits.float(), params)
        probs = filtered.softmax(dim=-1)
        return probs if order is None else torch.zeros_like(probs).scatter_(1, order, probs)

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


def _filter(
    logits: torch.Tensor, params: list[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Logits after temperature and top-k / top-p (dropped ones at -inf). When any row filters, the rows
    come back sorted descending, with the sort order and the drop mask; otherwise order and mask are None."""
    temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params]).unsqueeze(1)
    logits = logits / temperature
    vocab = logits.shape[1]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params]).clamp(max=vocab)
    top_p = torch.tensor([p.top_p for p in params])
    if not bool((top_k < vocab).any() or (top_p < 1).any()):
        return logits, None, None
    logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab).unsqueeze(0)
    drop = rank >= top_k.unsqueeze(1)
    probs = logits.softmax(dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    return logits.masked_fill(drop, float("-inf")), order, drop
