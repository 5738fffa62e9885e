"""The verify / accept rule: keep drafts while they equal the target's own tokens, vectorised over the batch.

For a request with drafts d_1..d_n, the target picks a token t_j at each of its n + 1 verify rows exactly as
a plain decode would at that output position: the argmax for a greedy request, else ``sampler.pick`` with
the request's noise for that position (``draws.exponentials``). Drafts are accepted while d_j == t_{j-1}; the
first mismatching row's t (or t_n when all matched) is the one target token added. Every emitted token is
therefore the target's own token at its position, given the same prefix:

- the output is exactly the target's output, greedy or sampled, token for token, with or without drafts
  (so a seeded request is the same alone, in a crowd that pauses speculation, or with another proposer);
- its distribution is the target's (each t_j is an exact sample of p_j, with a fresh draw per position).

A deterministic draft d (n-gram) is accepted with probability p(d), as in rejection sampling (Leviathan
et al. 2023). A draft model picks its drafts from its own distribution q with the same noise (the race
couples the two picks), so it is accepted with probability at least (1 - d) / (1 + d) for total variation
distance d, against rejection sampling's 1 - d: less when q differs from p, the price of output that does
not depend on whether speculation ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VerifyResult:
    """tokens[i]: request i's accepted drafts plus one target token; num_accepted[i]: drafts accepted."""

    tokens: list[list[int]]
    num_accepted: list[int]


def verify(target_ids: torch.Tensor, draft_ids: torch.Tensor, num_drafts: torch.Tensor) -> VerifyResult:
    """Accept or reject drafts of R requests at once.

    target_ids: int64 [R, K + 1], the target's token at each verify row (rows past ``num_drafts[i] + 1``
        are ignored); draft_ids: int64 [R, K], padded past ``num_drafts``; num_drafts: int64 [R].
    """
    k = draft_ids.shape[1]
    valid = torch.arange(k)[None, :] < num_drafts[:, None]
    num_accepted = ((draft_ids == target_ids[:, :k]) & valid).int().cumprod(1).sum(1)
    extra = target_ids.gather(1, num_accepted[:, None].long()).squeeze(1)
    drafts, accepted, extras = draft_ids.tolist(), num_accepted.tolist(), extra.tolist()
    return VerifyResult([d[:a] + [e] for d, a, e in zip(drafts, accepted, extras, strict=True)], accepted)
