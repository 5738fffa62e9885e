"""Prompts from the held-out stdlib files: code the shipped models never trained on.

Used by the demo and benchmarks/spec.py. Each prompt starts at the beginning of a line (a random
line of a random held-out file, seeded) and is cut to a token length.
"""

from __future__ import annotations

import re

import numpy as np

from meshserve.models.tokenizer import Tokenizer
from meshserve.training.corpus import read_held_out


def code_prompts(
    tokenizer: Tokenizer, n: int, min_tokens: int, max_tokens: int, seed: int = 0
) -> list[list[int]]:
    """n prompts (token ids, BOS first) of min_tokens..max_tokens tokens from held-out code."""
    texts = [t for _, t in sorted(read_held_out().items()) if len(t) > 8 * max_tokens]
    rng = np.random.default_rng(seed)
    prompts = []
    for i in rng.choice(len(texts), size=n, replace=len(texts) < n):
        text = texts[i]
        starts = [0] + [m.end() for m in re.finditer("\n", text[: len(text) - 6 * max_tokens])]
        start = starts[rng.integers(len(starts))]
        ids = tokenizer.encode(text[start : start + 8 * max_tokens])
        prompts.append(ids[: int(rng.integers(min_tokens, max_tokens + 1))])
    return prompts
