"""N-gram prompt lookup: propose the tokens that followed an earlier occurrence of the context's tail."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(tokens: Sequence[int] | np.ndarray, k: int, n_max: int, n_min: int) -> list[int]:
    """Up to ``k`` draft tokens for ``tokens``.

    Tries n-gram lengths ``n_max`` down to ``n_min``: finds (one array compare over all windows) the earlier
    positions where the last n tokens occurred and proposes the k tokens that followed the latest of them
    with k tokens after it (else the earliest, which has the most). Empty when no earlier occurrence exists.
    """
    ctx = np.asarray(tokens, dtype=np.int64)
    size = ctx.shape[0]
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        # Windows starting at 0 .. size-n-1: every earlier n-gram with at least one token after it.
        windows = sliding_window_view(ctx[:-1], n)
        hits = np.flatnonzero((windows == ctx[size - n :]).all(axis=1))
        if hits.size:
            full = hits[hits + n + k <= size]
            start = int(full[-1] if full.size else hits[0]) + n
            return ctx[start : start + k].tolist()
    return []


class NgramProposer:
    """Prompt-lookup proposer: deterministic, so its draft distribution is one-hot (q(x) = 1)."""

    def __init__(self, k: int, n_max: int, n_min: int) -> None:
        self.k, self.n_max, self.n_min = k, n_max, n_min

    def propose(self, contexts: Sequence[Sequence[int]], limits: Sequence[int]) -> list[list[int]]:
        """Drafts for each context, at most ``min(k, limits[i])`` tokens each."""
        return [
            propose_ngram(ctx, min(self.k, lim), self.n_max, self.n_min) if lim > 0 else []
            for ctx, lim in zip(contexts, limits, strict=True)
        ]
