"""The verify / accept rule: greedy matching and rejection sampling, vectorised over the batch.

For a request with drafts d_1..d_n and target distributions p_0..p_n at the n + 1 verify rows:
- greedy: accept d_j while it equals argmax p_{j-1}; then emit argmax of the first mismatching row (or of
  p_n when all matched), so the output is exactly the target's greedy output;
- sampled: accept d_j with probability min(1, p(d_j) / q(d_j)); at the first rejection emit a sample of
  normalize(max(0, p - q)), or a bonus sample of p_n when all were accepted. This keeps the output
  distribution equal to the target's (Leviathan et al. 2023). A deterministic proposer (n-gram) has
  one-hot q.
Random numbers come from each request's own generator, so a seeded request is reproducible whatever the
batch holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class VerifyResult:
    """tokens[i]: request i's accepted drafts plus one target token; num_accepted[i]: drafts accepted."""

    tokens: list[list[int]]
    num_accepted: list[int]


def verify(
    target_probs: torch.Tensor,
    draft_ids: torch.Tensor,
    num_drafts: torch.Tensor,
    greedy: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    draft_probs: torch.Tensor | None = None,
    draws_per_row: int = 0,
) -> VerifyResult:
    """Accept or reject drafts of R requests at once.

    target_probs: [R, K + 1, V] target probabilities at each request's verify rows (rows past
        ``num_drafts[i] + 1`` are ignored); for greedy requests any scores with the same argmax (logits).
    draft_ids: int64 [R, K] drafts, padded past ``num_drafts``.
    num_drafts: int64 [R].
    greedy: bool [R].
    generators: per request (None = torch's default generator); sampled requests only draw from them.
    draft_probs: [R, K, V] the proposer's distributions q, or None for a deterministic proposer (one-hot q).
    draws_per_row: uniforms each sampled request draws (at least K + 1): pass the proposer's k + 1 so a
        request consumes the same random numbers however wide the other verifies in the batch are.
    """
    rows, k1, vocab = target_probs.shape
    k = k1 - 1
    r = torch.arange(rows)
    p = target_probs.float()
    d = draft_ids.long().clamp(min=0)
    uniform, noise = _draws(rows, k1, max(k1, draws_per_row), vocab, greedy, generators)

    valid = torch.arange(k)[None, :] < num_drafts[:, None]
    p_d = p[:, :k].gather(2, d[..., None]).squeeze(-1)
    q_d = (
        torch.ones_like(p_d)
        if draft_probs is None
        else draft_probs.float().gather(2, d[..., None]).squeeze(-1)
    )
    accept = torch.where(greedy[:, None], d == p[:, :k].argmax(-1), uniform[:, :k] * q_d < p_d) & valid
    num_accepted = accept.int().cumprod(1).sum(1)

    p_a = p[r, num_accepted]
    rejected = num_accepted < num_drafts
    if k > 0:
        at = num_accepted.clamp(max=k - 1)
        q_a = (
            torch.nn.functional.one_hot(d[r, at], vocab).float()
            if draft_probs is None
            else draft_probs[r, at]
        )
        residual = (p_a - q_a.float()).clamp(min=0)
        total = residual.sum(-1, keepdim=True)
        residual = torch.where(total > 0, residual / total.clamp(min=1e-30), p_a)
        p_a_final = torch.where(rejected[:, None], residual, p_a)
    else:
        p_a_final = p_a
    # Exponential race: argmax f / e with e ~ Exp(1) picks index i with probability f_i.
    sampled = (p_a_final / noise).argmax(-1)
    extra = torch.where(greedy, p_a.argmax(-1), sampled)

    drafts, accepted, extras = d.tolist(), num_accepted.tolist(), extra.tolist()
    tokens = [drafts[i][: accepted[i]] + [extras[i]] for i in range(rows)]
    return VerifyResult(tokens, accepted)


def verify_greedy(
    target_ids: torch.Tensor, draft_ids: torch.Tensor, num_drafts: torch.Tensor
) -> VerifyResult:
    """Greedy verification from token ids alone: ``target_ids`` int64 [R, K + 1] is the target's argmax at
    each verify row; the same result as ``verify`` with every request greedy, in a few integer ops."""
    k = draft_ids.shape[1]
    valid = torch.arange(k)[None, :] < num_drafts[:, None]
    num_accepted = ((draft_ids == target_ids[:, :k]) & valid).int().cumprod(1).sum(1)
    extra = target_ids.gather(1, num_accepted[:, None].long()).squeeze(1)
    drafts, accepted, extras = draft_ids.tolist(), num_accepted.tolist(), extra.tolist()
    return VerifyResult([d[:a] + [e] for d, a, e in zip(drafts, accepted, extras, strict=True)], accepted)


def _draws(
    rows: int,
    k1: int,
    draws: int,
    vocab: int,
    greedy: torch.Tensor,
    generators: Sequence[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniforms [R, K + 1] (of ``draws`` per row) and Exp(1) noise [R, V] from each sampled request's
    generator, the same count whatever the batch."""
    uniform = torch.zeros(rows, k1)
    noise = torch.ones(rows, vocab)
    for i in torch.nonzero(~greedy).flatten().tolist():
        uniform[i] = torch.rand(draws, generator=generators[i])[:k1]
        noise[i].exponential_(generator=generators[i])
    return uniform, noise
