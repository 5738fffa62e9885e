"""Cost of the prefix cache's chain keys on a long prompt: publishing it and matching it again.

    flock /tmp/meshserve-heavy.lock .venv/bin/python benchmarks/prefix_keys.py [--tokens 32768]

Each block's key is a digest of its parent's key and its tokens (engine/prefix_cache.py); run it with
PYTHONPATH at an older checkout to compare another key scheme on the same prompt.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from meshserve.engine.prefix_cache import PrefixCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    tokens = np.random.default_rng(0).integers(0, 150_000, args.tokens).tolist()
    blocks = list(range(args.tokens // args.block_size))
    publish, match = [], []
    for _ in range(args.repeats):
        cache = PrefixCache(args.block_size)
        start = time.perf_counter()
        cache.publish(blocks, tokens, len(tokens), [])
        publish.append(time.perf_counter() - start)
        start = time.perf_counter()
        m = cache.match(tokens)
        match.append(time.perf_counter() - start)
        assert len(m.block_ids) == len(blocks)
    print(
        f"{args.tokens} tokens, {len(blocks)} blocks of {args.block_size}: "
        f"publish {np.median(publish) * 1e3:.2f} ms, "
        f"match {np.median(match) * 1e3:.2f} ms (median of {args.repeats})"
    )


if __name__ == "__main__":
    main()
