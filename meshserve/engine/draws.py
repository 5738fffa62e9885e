"""Counter-based random draws: a request's noise at output position t is a hash of (seed, t, token id).

Nothing is consumed from a stream, so a token's draws are the same whatever else ran before it: alone or
in any crowd, with any chunk budget, and whether the token comes from a plain decode or from a speculative
verify row (or a draft model proposing it). The hash is SplitMix64's finalizer (Steele et al. 2014), over
the whole batch at once in numpy's wrapping uint64 arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_MASK = (1 << 64) - 1
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment: consecutive counters land far apart


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: a bijection on uint64; every output bit depends on every input bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def exponentials(seeds: Sequence[int], positions: Sequence[int], vocab: int) -> torch.Tensor:
    """Exp(1) noise float32 [R, vocab], one per token id: row i's draws for output position
    ``positions[i]`` of the request seeded ``seeds[i]`` (any 64-bit seed, negative ones included)."""
    s = np.array([seed & _MASK for seed in seeds], dtype=np.uint64)
    rows = _mix(_mix(s) + np.asarray(positions, dtype=np.uint64) * _GAMMA)
    z = _mix(rows[:, None] + np.arange(1, vocab + 1, dtype=np.uint64)[None, :] * _GAMMA)
    u = ((z >> np.uint64(40)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)  # in (0, 1)
    return torch.from_numpy(-np.log(u))
