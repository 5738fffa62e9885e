"""Sampling the next token from a batch of logits rows: greedy, temperature, min-p, top-k, top-p, logprobs.

One row per sampling request, all rows at once. A sampled row's token is the exponential race over its
filtered distribution, argmax_i p_i / e_i with e_i ~ Exp(1) (which picks i with probability p_i / sum p),
and the noise e_i is its request's draw for that output position and token id (``draws.exponentials``).
So a row's token depends only on its own logits, settings, seed and position. Speculative verification
picks the target's tokens with this same function, so a token is the same whether a decode or a verify
produced it, and a draft model that picks with the same noise agrees with the target as often as the
race couples p and q (at least (1 - d) / (1 + d) for total variation distance d).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from meshserve.engine.draws import exponentials
from meshserve.engine.sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    """Sampled token per row, and per row the top logprobs (None where the request did not ask)."""

    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


def sample(
    logits: torch.Tensor, params: list[SamplingParams], seeds: Sequence[int], positions: Sequence[int]
) -> SamplerOutput:
    """One token per row (see ``pick``) and the logprobs the rows asked for."""
    logits = logits.float()
    tokens = pick(logits, params, seeds, positions).tolist()
    return SamplerOutput(tokens, _logprobs(logits, params, tokens))


def pick(
    logits: torch.Tensor, params: list[SamplingParams], seeds: Sequence[int], positions: Sequence[int]
) -> torch.Tensor:
    """int64 [N]: the argmax for greedy rows, else the race over the filtered distribution with the noise
    of (``seeds[i]``, ``positions[i]``)."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        index = torch.tensor(rows)
        probs, order = _distribution(logits[index], [params[i] for i in rows])
        total = probs.sum(dim=-1)
        if not bool((total.isfinite() & (total > 0)).all()):  # the engine fails only such rows' requests
            raise FloatingPointError("the sampling distribution is NaN, infinite or empty")
        noise = exponentials([seeds[i] for i in rows], [positions[i] for i in rows], logits.shape[1])
        # noise is per token id, so the rows listed in sorted order (top-k / top-p) see the same draws
        choice = (probs / noise.gather(1, order)).argmax(dim=-1)
        tokens[index] = order.gather(1, choice.unsqueeze(1)).squeeze(1)
    return tokens


def _logprobs(
    logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]
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
