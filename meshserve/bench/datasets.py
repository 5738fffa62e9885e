"""Benchmark prompts: random token ids, shared-prefix repetitions, or a ShareGPT JSON file.

Prompts are token-id lists where the dataset is synthetic (the server sees exactly ``input_len``
tokens, no tokenizer needed on the client, as vLLM's random dataset intends) and text for ShareGPT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meshserve.errors import InputError, require

DATASETS = ("random", "prefix-repetition", "sharegpt-file")
FIRST_ID = 3  # skip the usual special ids (pad, bos, eos)


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int  # tokens (synthetic) or words (ShareGPT text, an estimate)
    output_len: int


def random_requests(
    n: int,
    input_len: int,
    output_len: int,
    vocab: int,
    rng: np.random.Generator,
) -> list[BenchRequest]:
    ids = rng.integers(FIRST_ID, vocab, size=(n, input_len))
    return [BenchRequest(row.tolist(), input_len, output_len) for row in ids]


def prefix_repetition_requests(
    n: int,
    prefix_len: int,
    suffix_len: int,
    num_prefixes: int,
    output_len: int,
    vocab: int,
    rng: np.random.Generator,
) -> list[BenchRequest]:
    """``num_prefixes`` shared prefixes, each prompt one of them plus its own random suffix."""
    prefixes = rng.integers(FIRST_ID, vocab, size=(num_prefixes, prefix_len))
    suffixes = rng.integers(FIRST_ID, vocab, size=(n, suffix_len))
    return [
        BenchRequest(
            prefixes[i % num_prefixes].tolist() + suffixes[i].tolist(), prefix_len + suffix_len, output_len
        )
        for i in range(n)
    ]


def sharegpt_requests(
    path: str, n: int, output_len: int | None, rng: np.random.Generator
) -> list[BenchRequest]:
    """First human turn of conversations with a reply; output length the reply's word count unless given."""
    file = Path(path)
    require(file.is_file(), "dataset_path", f"{path} is not a file")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError("dataset_path", f"invalid JSON ({err})") from None
    pairs = []
    for item in data if isinstance(data, list) else []:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2]):
            prompt, reply = str(turns[0].get("value", "")), str(turns[1].get("value", ""))
            if prompt and reply:
                pairs.append((prompt, reply))
    require(len(pairs) > 0, "dataset_path", "no conversations with a prompt and a reply (ShareGPT format)")
    order = rng.permutation(len(pairs))[:n]
    return [
        BenchRequest(pairs[i][0], len(pairs[i][0].split()), output_len or max(1, len(pairs[i][1].split())))
        for i in order
    ]
