"""Prefix cache: hash chain lookups, copy-on-write partial matches, LRU eviction only at ref count 0."""

from __future__ import annotations

from collections import Counter

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.engine.kv_cache import BlockManager
from meshserve.engine.prefix_cache import PrefixCache, copy_blocks
from meshserve.engine.request import Request
from meshserve.engine.sampling_params import SamplingParams

BS = 4


def prefix_fingerprints(tokens: list[int]) -> list[int]:
    """A rolling fingerprint of tokens[: i + 1] for each i (exact in float32: below 2**24)."""
    out, h = [], 0
    for t in tokens:
        h = (h * 1009 + t + 1) % 16_777_213
        out.append(h)
    return out


class Pool:
    """The engine's BlockManager wired to a PrefixCache, with requests whose prompts count as computed."""

    def __init__(self, num_blocks: int, cache: PrefixCache) -> None:
        self.cache = cache
        self.kv = [torch.zeros(2, num_blocks, BS, 1, 2)]
        self.blocks = BlockManager(num_blocks, BS, cache, self.kv)
        self.requests: dict[int, Request] = {}

    @property
    def tables(self) -> dict[int, list[int]]:
        return {rid: r.block_table for rid, r in self.requests.items()}

    @property
    def free(self) -> list[int]:
        return list(self.blocks.free_blocks)

    def add(self, rid: int, tokens: list[int]) -> bool:
        """Admit a request (sharing its cached prefix) and 'compute' its prompt; False if it does not fit."""
        if not self.admit(rid, tokens):
            return False
        self.compute(rid)
        return True

    def admit(self, rid: int, tokens: list[int]) -> bool:
        """Admit a request, sharing its cached prefix but computing nothing; False if it does not fit."""
        request = Request(str(rid), tokens, SamplingParams(), max_tokens=1)
        reused = self.blocks.match_prefix(request)
        if not self.blocks.allocate(request, len(tokens)):
            self.blocks.free(request)
            return False
        self.blocks.record_prefix(request, reused)
        self.requests[rid] = request
        self._check(request, reused)
        return True

    def compute(self, rid: int, n: int | None = None) -> None:
        """'Compute' the next ``n`` prompt tokens (default: all) and publish the blocks they fill. The KV of a
        token is its id and a fingerprint of the whole prefix up to it, as real KV depends on every earlier
        token."""
        request = self.requests[rid]
        tokens, done = request.token_ids, request.num_computed_tokens
        end = len(tokens) if n is None else min(len(tokens), done + n)
        fingerprints = prefix_fingerprints(tokens)
        for pos in range(done, end):
            self.kv[0][0, request.block_table[pos // BS], pos % BS] = torch.tensor(
                [tokens[pos], fingerprints[pos]]
            )
        request.num_computed_tokens = end
        self._check(request, end)
        self.blocks.publish(request)

    def _check(self, request: Request, n: int) -> None:
        """Shared and copied-on-write blocks hold exactly this prompt's KV up to ``n``, prefix included."""
        kv = self._kv(request)[:n]
        assert kv[:, 0].tolist() == request.token_ids[:n], "a block of other tokens was shared"
        assert kv[:, 1].tolist() == prefix_fingerprints(request.token_ids)[:n], (
            "a block computed after another prefix was shared"
        )

    def _kv(self, request: Request) -> torch.Tensor:
        """The request's K values [positions, 2] in position order, read through its block table."""
        return self.kv[0][0, request.block_table, :, 0].reshape(-1, 2)

    def finish(self, rid: int) -> None:
        self.blocks.free(self.requests.pop(rid))

    def check(self) -> None:
        refs = Counter(b for r in self.requests.values() for b in r.block_table)
        counts = self.blocks.ref_counts
        assert all(counts[b] == n for b, n in refs.items()) and min(counts) >= 0
        free = set(self.blocks.free_blocks)
        evictable = {b for b in range(len(counts)) if self.cache.is_evictable(b)}
        assert not evictable & refs.keys(), "a referenced block is evictable"
        assert not evictable & free and not free & refs.keys()
        assert len(free) + len(evictable) + len(refs) == len(counts), "a block leaked"


def test_longest_prefix_is_shared_block_by_block() -> None:
    cache = PrefixCache(BS)
    pool = Pool(16, cache)
    assert pool.add(0, list(range(10)))  # blocks [0..3], [4..7] full; [8, 9] partial, not cached
    assert cache.num_cached == 2
    m = cache.match(list(range(8)) + [50, 51, 52])
    assert m.block_ids == pool.tables[0][:2] and m.num_tokens == 8 and m.copy_src is None
    assert cache.match([1, 2, 3, 4, 5]).num_tokens == 0  # same tokens at another position: no hit


def test_partial_block_is_reused_by_copy_on_write() -> None:
    cache = PrefixCache(BS)
    pool = Pool(16, cache)
    pool.add(0, list(range(12)))
    m = cache.match([0, 1, 2, 3, 4, 5, 99, 98, 97])  # diverges inside the second block
    assert m.block_ids == pool.tables[0][:1]
    assert m.copy_src == pool.tables[0][1] and m.num_tokens == 6
    # A whole cached prompt is matched one token short, so the last token is computed and sampled.
    m = cache.match(list(range(12)), max_tokens=11)
    assert m.block_ids == pool.tables[0][:2] and m.copy_src == pool.tables[0][2] and m.num_tokens == 11


def test_evicted_only_when_unreferenced_and_least_recent_first() -> None:
    cache = PrefixCache(BS)
    pool = Pool(4, cache)
    pool.add(0, list(range(8)))
    pool.add(1, list(range(100, 108)))
    assert cache.evict() is None  # everything is referenced
    pool.finish(0)
    pool.finish(1)
    assert cache.num_evictable == 4 and not pool.free  # kept resident until space is needed
    assert cache.match(list(range(8)) + [1]).num_tokens == 8
    evicted = cache.evict()
    # Request 0's tail went first.
    assert evicted is not None and cache.match(list(range(8)) + [1]).num_tokens == 4


def test_hit_rate_statistics() -> None:
    cache = PrefixCache(BS)
    pool = Pool(8, cache)
    pool.add(0, list(range(9)))
    pool.add(1, list(range(9)))
    stats = cache.stats()
    assert stats["queried_tokens"] == 18 and stats["hit_tokens"] == 8
    assert abs(stats["hit_rate"] - 8 / 18) < 1e-9


def test_copy_blocks_copies_every_layer() -> None:
    kv = [torch.randn(2, 6, BS, 2, 3) for _ in range(3)]
    before = [t.clone() for t in kv]
    copy_blocks(kv, [1, 4], [5, 0])
    for t, b in zip(kv, before, strict=True):
        assert torch.equal(t[:, 5], b[:, 1]) and torch.equal(t[:, 0], b[:, 4])
        assert torch.equal(t[:, 2], b[:, 2])


ops = st.lists(
    st.tuples(st.booleans(), st.lists(st.integers(0, 2), min_size=1, max_size=14)), min_size=1, max_size=40
)


@settings(max_examples=60, deadline=None)
@given(ops=ops, num_blocks=st.integers(4, 12))
def test_never_evicts_referenced_blocks_never_leaks(
    ops: list[tuple[bool, list[int]]], num_blocks: int
) -> None:
    cache = PrefixCache(BS)
    pool = Pool(num_blocks, cache)
    next_id = 0
    for finish_one, tokens in ops:
        if finish_one and pool.tables:
            pool.finish(min(pool.tables))
        elif pool.add(next_id, tokens):
            next_id += 1
        pool.check()
    for rid in list(pool.tables):
        pool.finish(rid)
    pool.check()
    assert len(pool.free) + cache.num_evictable == num_blocks
    while cache.evict() is not None:
        pass
    assert cache.num_cached == 0


def scan_partial(cache: PrefixCache, parent: bytes, rest: list[int]) -> int:
    """The old admission path, kept as the oracle: scan every cached child of ``parent``."""
    children = [e for e in cache._entries.values() if e.parent == parent]
    shared = [
        next(
            (i for i, (a, b) in enumerate(zip(e.tokens, rest, strict=False)) if a != b),
            min(len(e.tokens), len(rest)),
        )
        for e in children
    ]
    return max(shared, default=0)


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=14), min_size=1, max_size=30),
    queries=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=14), min_size=1, max_size=10),
    num_blocks=st.integers(4, 16),
)
def test_prefix_index_finds_what_a_scan_of_every_cached_block_finds(prompts, queries, num_blocks) -> None:
    cache = PrefixCache(BS, min_copy_tokens=1)
    pool = Pool(num_blocks, cache)
    for rid, tokens in enumerate(prompts):  # publish, finish (evictable) and evict as space runs out
        if pool.add(rid, tokens):
            pool.finish(rid)
    for tokens in queries:
        m = cache.match(tokens)
        parent = cache._entries[m.block_ids[-1]].key if m.block_ids else cache.root
        rest = tokens[len(m.block_ids) * BS :]
        assert m.num_tokens - len(m.block_ids) * BS == scan_partial(cache, parent, rest)
        if m.copy_src is not None:  # the block it copies really holds those tokens
            extra = m.num_tokens - len(m.block_ids) * BS
            assert cache._entries[m.copy_src].tokens[:extra] == tuple(rest[:extra])


def test_short_partial_matches_are_not_copied() -> None:
    cache = PrefixCache(16)
    assert cache.min_copy_tokens == 4
    blocks = BlockManager(8, 16, cache, [torch.zeros(2, 8, 16, 1, 2)])
    first = Request("a", [1] + list(range(100, 120)), SamplingParams(), max_tokens=1)
    blocks.allocate(first, first.num_tokens)
    first.num_computed_tokens = first.num_tokens
    blocks.publish(first)
    bos_only = Request("b", [1, 7, 8, 9, 10], SamplingParams(), max_tokens=1)  # shares only BOS
    assert blocks.match_prefix(bos_only) == 0 and bos_only.block_table == []
    five = Request("c", [1, 100, 101, 102, 103, 9, 9], SamplingParams(), max_tokens=1)
    assert blocks.match_prefix(five) == 5 and len(five.block_table) == 1  # worth a copy


def test_an_admission_that_cannot_fit_makes_no_copy(monkeypatch) -> None:
    cache = PrefixCache(BS)
    pool = Pool(6, cache)
    assert pool.add(0, list(range(8)))  # two full cached blocks
    assert pool.add(1, [90 + i for i in range(12)])  # three more blocks held: one free block left
    copies = []
    monkeypatch.setattr("meshserve.engine.kv_cache.copy_blocks", lambda kv, src, dst: copies.append(src))
    # 16 tokens = 4 blocks: one shared, one copied from [4..7] for its [4, 5], two new; only 1 is free
    waiting = Request("w", list(range(6)) + list(range(60, 70)), SamplingParams(), max_tokens=1)
    for _ in range(3):  # as the scheduler retries it every step
        assert pool.blocks.match_prefix(waiting, budget=64) is None
    assert copies == [] and waiting.block_table == [] and waiting.num_computed_tokens == 0
    pool.check()
    pool.finish(1)
    assert pool.blocks.match_prefix(waiting, budget=64) == 6 and len(copies) == 1  # now it fits: one copy


def parent_blind_key(parent: object, tokens: object) -> tuple:
    """A chain key that ignores the parent: every block of the same tokens collides, wherever it sits."""
    return ("collide", tuple(tokens))


def test_a_key_collision_never_serves_another_prefix(monkeypatch) -> None:
    monkeypatch.setattr(PrefixCache, "key", staticmethod(parent_blind_key))
    cache = PrefixCache(BS)
    pool = Pool(16, cache)
    x, y, w, z = [1] * BS, [2] * BS, [3] * BS, [4] * BS
    assert pool.add(0, x + z)  # caches block x (first)
    assert pool.add(1, w + y)  # caches y after w
    # x then y: its first block is cached, and y's key collides with the y cached after w. Reusing that
    # block would attend w's KV (Pool.add checks); only x may be shared.
    assert pool.add(2, x + y + [5])
    assert pool.tables[2][0] == pool.tables[0][0] and cache.match(x + y + [5]).block_ids == [
        pool.tables[0][0]
    ]


def test_a_colliding_block_ends_its_request_s_publishing(monkeypatch) -> None:
    monkeypatch.setattr(PrefixCache, "key", staticmethod(parent_blind_key))
    cache = PrefixCache(BS)
    pool = Pool(16, cache)
    x, y, w, z = [1] * BS, [2] * BS, [3] * BS, [4] * BS
    assert pool.add(0, x + y + [9])
    # w's y collides with x's y, so the z after it must not be published under that ambiguous key: a later
    # x + y + z would take this z, computed after w.
    assert pool.add(1, w + y + z + [9])
    assert cache.num_cached == 3  # x, x's y, w: nothing after the collision
    assert pool.add(2, x + y + z + [9])  # computes its own z


def test_chain_keys_are_digests_from_a_random_root() -> None:
    a, b = PrefixCache(BS), PrefixCache(BS)
    assert a.root != b.root and len(a.root) == 32  # no guessable root, so no precomputed collisions
    pa, pb = Pool(4, a), Pool(4, b)
    pa.add(0, list(range(5)))
    pb.add(0, list(range(5)))
    (ka,), (kb,) = pa.requests[0].block_keys, pb.requests[0].block_keys
    assert ka != kb and len(ka) == 32


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(
        st.lists(st.sampled_from([(0,) * BS, (1,) * BS, (0, 1, 0, 1)]), min_size=1, max_size=4).map(
            lambda blocks: [t for b in blocks for t in b]
        ),
        min_size=1,
        max_size=30,
    ),
    tails=st.lists(st.integers(0, 2), max_size=30),
    keep=st.lists(st.booleans(), max_size=30),
    num_blocks=st.integers(6, 20),
)
def test_shared_blocks_always_hold_the_whole_prefix(prompts, tails, keep, num_blocks) -> None:
    """Prompts made of a few recurring blocks (the same block under many parents, where a chain key that
    forgets the parent collides): every block the cache hands out holds KV computed after exactly the
    asking prompt's prefix (Pool.add compares the prefix fingerprints of every position)."""
    cache = PrefixCache(BS, min_copy_tokens=1)
    pool = Pool(num_blocks, cache)
    for rid, tokens in enumerate(prompts):
        tokens = tokens + tails[rid : rid + 1]  # sometimes a partial last block
        if pool.add(rid, tokens) and not (keep[rid] if rid < len(keep) else False):
            pool.finish(rid)
        pool.check()


@settings(max_examples=80, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(
                st.just("admit"), st.lists(st.sampled_from([(0,) * BS, (1,) * BS, (0, 1, 0, 1)]), max_size=4)
            ),
            st.tuples(st.just("compute"), st.integers(0, 9), st.integers(1, 3 * BS)),
            st.tuples(st.just("finish"), st.integers(0, 9)),
        ),
        max_size=40,
    ),
    num_blocks=st.integers(6, 20),
)
def test_concurrent_prefills_share_only_blocks_of_their_own_prefix(ops, num_blocks) -> None:
    """As the engine's chunked prefills: requests admitted before others publish, computed in pieces in any
    order, so the same prefix is computed twice and blocks publish after duplicates. Every shared block still
    holds KV of exactly the asking prompt's prefix (Pool checks at admission and after every piece)."""
    cache = PrefixCache(BS, min_copy_tokens=1)
    pool = Pool(num_blocks, cache)
    for rid, op in enumerate(ops):
        live = sorted(pool.requests)
        if op[0] == "admit":
            pool.admit(rid, [t for block in op[1] for t in block] + [rid % 3])
        elif live and op[0] == "compute":
            pool.compute(live[op[1] % len(live)], op[2])
        elif live:
            pool.finish(live[op[1] % len(live)])
        pool.check()
