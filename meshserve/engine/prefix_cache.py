"""Automatic prefix caching: a hash chain over full KV blocks, with LRU eviction of unreferenced blocks.

A block's key is a BLAKE2b digest of its parent's key and its token ids (the first block's parent is a random
root drawn per cache), so one key names the whole prefix up to and including that block (a radix tree of
blocks, as in XY-Serve, stored flat). Python's ``hash`` would not do: it is unsalted for ints and tuples, so
anyone can craft two prompts whose chains collide and be served the other's KV (vLLM's CVE-2025-25183). A hit
also checks the block's parent key and tokens, so each link of the chain is verified back to the root; two
different chains share a key only if BLAKE2b collides. Publishing checks the same before it reuses a key.

Only full blocks of *verified* tokens are ever published: draft tokens never enter the chain. The block
manager owns ref counts and the free list; this object only remembers which blocks hold which prefix, and
which of those nobody references (evictable, kept in least-recently-released order so that space is
reclaimed only when needed).

A partly matching block (the request diverges inside it, or the match is capped one token short of the
prompt) is reused token-granularly by copy-on-write: the caller copies the cached block into a fresh one
and recomputes only from the first differing token. Finding it must not cost more as the cache grows
(every prompt that starts with BOS partly matches every cached first block): each cached block is also
indexed under every proper prefix of its tokens, ``(parent, tokens[:j])``, and the longest shared prefix
is a binary search over j (a prefix that is cached implies all shorter ones are). A match shorter than
``min_copy_tokens`` is not copied: moving a whole block to skip a token or two saves nothing.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

KEY_BYTES = 32  # BLAKE2b digest size: collisions need ~2**128 work


@dataclass
class PrefixMatch:
    """The cached part of a prompt.

    block_ids: cached full blocks to share, in order.
    copy_src: a cached block whose first ``num_tokens - len(block_ids) * block_size`` tokens also match;
        the caller copies it into a fresh block (copy-on-write) before writing there. None if no such block.
    num_tokens: tokens whose KV needs no recomputation.
    """

    block_ids: list[int]
    copy_src: int | None
    num_tokens: int


@dataclass
class _Entry:
    key: bytes
    parent: bytes  # the parent block's key (the cache's root for a first block)
    tokens: tuple[int, ...]


class PrefixCache:
    """Prefix hash chain over KV blocks of ``block_size`` tokens, plus the LRU of evictable cached blocks."""

    def __init__(self, block_size: int, min_copy_tokens: int | None = None) -> None:
        self.block_size = block_size
        # Default: a quarter block (4 tokens at block size 16; 1 at 4, so tiny blocks still copy).
        self.min_copy_tokens = max(1, block_size // 4) if min_copy_tokens is None else min_copy_tokens
        self.root = os.urandom(KEY_BYTES)  # parent key of every first block: unguessable, per cache
        self._by_key: dict[bytes, int] = {}  # prefix key -> block id
        self._entries: dict[int, _Entry] = {}  # block id -> its key, parent key and tokens
        # (parent key, hash of a proper token prefix) -> cached child blocks that start with that prefix
        # (a collision of that hash only costs a miss: every candidate's tokens are compared)
        self._prefixes: dict[tuple[bytes, int], dict[int, None]] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks with ref count 0, oldest first
        self.queried_tokens = 0
        self.hit_tokens = 0

    # -- lookup ---------------------------------------------------------------------------------------
    @staticmethod
    def key(parent: bytes, tokens: bytes) -> bytes:
        """Chain key of a block: the digest of its parent's key and its tokens (int64 bytes)."""
        return hashlib.blake2b(parent + tokens, digest_size=KEY_BYTES).digest()

    def match(self, token_ids: Sequence[int], max_tokens: int | None = None) -> PrefixMatch:
        """Longest cached prefix of ``token_ids[:max_tokens]``, full blocks first, then a partial block."""
        bs = self.block_size
        limit = len(token_ids) if max_tokens is None else max(0, min(max_tokens, len(token_ids)))
        full = limit // bs * bs
        data = _token_bytes(token_ids[:full])  # one conversion; each block hashes a slice of it
        blocks: list[int] = []
        parent = self.root
        for start in range(0, full, bs):
            chunk = tuple(token_ids[start : start + bs])
            block = self._by_key.get(self.key(parent, data[start * 8 : (start + bs) * 8]))
            if block is None or not self._links(self._entries[block], parent, chunk):
                break
            blocks.append(block)
            parent = self._entries[block].key
        src, extra = self._partial(parent, token_ids[len(blocks) * bs : limit])
        return PrefixMatch(blocks, src, len(blocks) * bs + extra)

    @staticmethod
    def _links(entry: _Entry, parent: bytes, tokens: tuple[int, ...]) -> bool:
        """Whether ``entry`` is the block of ``tokens`` after the block keyed ``parent``: a key that matched
        but fails this is a collision, and its KV belongs to another prefix."""
        return entry.parent == parent and entry.tokens == tokens

    def _partial(self, parent: bytes, rest: Sequence[int]) -> tuple[int | None, int]:
        """A cached child of ``parent`` sharing the longest token prefix with ``rest``: O(log block_size)
        index lookups, whatever the cache holds."""
        lo, hi, best = 0, min(len(rest), self.block_size - 1), None
        while lo < hi:  # invariant: some child shares lo tokens; none shares more than hi
            mid = (lo + hi + 1) // 2
            head = tuple(rest[:mid])
            block = next(iter(self._prefixes.get((parent, hash(head)), ())), None)
            if block is not None and self._entries[block].tokens[:mid] == head:  # not a hash collision
                lo, best = mid, block
            else:
                hi = mid - 1
        if best is None or lo < self.min_copy_tokens:
            return None, 0
        return best, lo

    def _index(self, block: int, entry: _Entry, add: bool) -> None:
        """Add ``block`` to (or drop it from) the prefix index under each proper prefix of its tokens."""
        for j in range(1, self.block_size):
            key = (entry.parent, hash(entry.tokens[:j]))
            if add:
                self._prefixes.setdefault(key, {})[block] = None
            else:
                blocks = self._prefixes[key]
                del blocks[block]
                if not blocks:
                    del self._prefixes[key]

    # -- publishing verified blocks --------------------------------------------------------------------
    def publish(
        self, block_table: Sequence[int], token_ids: Sequence[int], num_tokens: int, keys: list[bytes]
    ) -> None:
        """Hash the blocks of ``block_table`` that ``num_tokens`` verified tokens fill.

        ``keys`` is the request's list of chain keys of its blocks published so far; it is extended in place
        (the request keeps it, so publishing is incremental). A block whose prefix is already cached under
        another block id (computed twice concurrently) stays unpublished and is freed as usual; a block whose
        key is taken by another prefix (a collision) ends the request's publishing.
        """
        bs = self.block_size
        full = min(num_tokens // bs, len(block_table))
        parent, first = (keys[-1] if keys else self.root), len(keys)
        data = _token_bytes(token_ids[first * bs : full * bs])
        for i in range(first, full):
            block = block_table[i]
            entry = self._entries.get(block)
            if entry is None:
                chunk = tuple(token_ids[i * bs : (i + 1) * bs])
                at = (i - first) * bs * 8
                key = self.key(parent, data[at : at + bs * 8])
                other = self._by_key.get(key)
                if other is None:
                    self._entries[block] = _Entry(key, parent, chunk)
                    self._by_key[key] = block
                    self._index(block, self._entries[block], add=True)
                elif not self._links(self._entries[other], parent, chunk):
                    return  # a collision: this chain's key names another prefix, so it publishes no further
            else:
                key = entry.key
            keys.append(key)
            parent = key

    # -- ref-count transitions (called by the block manager) --------------------------------------------
    def touch(self, block: int) -> None:
        """A cached block's ref count went 0 -> 1: it is no longer evictable."""
        self._lru.pop(block, None)

    def release(self, block: int) -> bool:
        """A block's ref count reached 0. True: it is cached and stays resident (evictable), so the caller
        must not put it on the free list."""
        if block not in self._entries:
            return False
        self._lru[block] = None
        return True

    def evict(self) -> int | None:
        """Forget the least recently released unreferenced cached block and hand its id back, or None."""
        if not self._lru:
            return None
        block, _ = self._lru.popitem(last=False)
        entry = self._entries.pop(block)
        del self._by_key[entry.key]
        self._index(block, entry, add=False)
        return block

    def num_pinned(self, m: PrefixMatch) -> int:
        """Evictable blocks that taking ``m`` would pin (its shared blocks and copy source): subtract them
        from the capacity when checking whether the rest of the request fits."""
        blocks = m.block_ids if m.copy_src is None else [*m.block_ids, m.copy_src]
        return sum(b in self._lru for b in blocks)

    def is_evictable(self, block: int) -> bool:
        return block in self._lru

    @property
    def num_evictable(self) -> int:
        return len(self._lru)

    @property
    def num_cached(self) -> int:
        return len(self._entries)

    def record(self, queried: int, hit: int) -> None:
        """Count tokens looked up by an admitted request and how many were found cached."""
        self.queried_tokens += queried
        self.hit_tokens += hit

    def stats(self) -> dict[str, float]:
        """Tokens asked for, tokens found cached, and their ratio (over the cache's lifetime)."""
        rate = self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
        return {"queried_tokens": self.queried_tokens, "hit_tokens": self.hit_tokens, "hit_rate": rate}


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian int64 bytes (8 per token), the input of the chain keys."""
    return np.asarray(token_ids, dtype="<i8").tobytes()


def copy_blocks(kv_caches: Sequence[torch.Tensor], src: Sequence[int], dst: Sequence[int]) -> None:
    """Copy whole KV blocks ``src[i] -> dst[i]`` in every layer (copy-on-write of a shared prefix block).

    Each cache is ``[2, num_blocks, block_size, num_kv_heads, head_dim]``.
    """
    if not src:
        return
    s = torch.as_tensor(list(src), dtype=torch.long)
    d = torch.as_tensor(list(dst), dtype=torch.long)
    for kv in kv_caches:
        kv[:, d] = kv[:, s]
