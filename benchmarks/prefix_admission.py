"""Prefix-cache admission cost as the cache grows: the prefix index vs a scan of every cached first block.

    flock /tmp/meshserve-bench.lock .venv/bin/python benchmarks/prefix_admission.py [--sizes 100 1000 10000]

Every prompt starts with BOS (token 1), so every cached first block partly matches every new prompt;
the scan (what admission did before the index, kept here as numpy over all cached first blocks) grows
with the cache, the index (PrefixCache.match) does a few dict lookups.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from meshserve.engine.prefix_cache import PrefixCache


def scan_partial(cache: PrefixCache, rest: list[int]) -> int:
    """Longest shared prefix of ``rest`` with any cached first block, by scanning all of them."""
    stored = np.array([e.tokens for e in cache._entries.values() if e.parent == cache.root], dtype=np.int64)
    want = np.asarray(rest[: cache.block_size], dtype=np.int64)
    return int(np.cumprod(stored[:, : len(want)] == want[None, :], axis=1).sum(axis=1).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for n in args.sizes:
        cache = PrefixCache(16, min_copy_tokens=1)
        for i in range(n):  # n requests of 2 full blocks, all starting with BOS
            cache.publish([2 * i, 2 * i + 1], [1, *rng.integers(3, 4096, 31).tolist()], 32, [])
        query = [1, *rng.integers(3, 4096, 100).tolist()]
        assert cache.match(query).num_tokens == scan_partial(cache, query)
        timings = {}
        for name, fn in (
            ("index", lambda q=query, c=cache: c.match(q)),
            ("scan", lambda q=query, c=cache: scan_partial(c, q)),
        ):
            start = time.perf_counter()
            for _ in range(args.repeats):
                fn()
            timings[name] = (time.perf_counter() - start) / args.repeats * 1e6
        print(
            f"{n:6d} cached first blocks: index {timings['index']:8.1f} us/admission, "
            f"scan {timings['scan']:8.1f} us/admission"
        )


if __name__ == "__main__":
    main()
