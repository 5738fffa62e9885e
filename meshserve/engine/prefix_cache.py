"""Automatic prefix caching: a hash chain over full KV blocks, with LRU eviction of unreferenced blocks.

A block's key is ``hash((parent_key, tokens))``, so one key names the whole prefix up to and including that
block (a radix tree of blocks, as in XY-Serve, stored flat). Only full blocks of *verified* tokens are ever
published: draft tokens never enter the chain. The block manager owns ref counts and the free list; this
object only remembers which blocks hold which prefix, and which of those nobody references (evictable, kept
in least-recently-released order so that space is reclaimed only when needed).

A partly matching block (the request diverges inside it, or the match is capped one token short of the
prompt) is reused token-granularly by copy-on-write: the caller copies the cached block into a fresh one
and recomputes only from the first differing token.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


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
    key: int
    parent: int | None
    tokens: tuple[int, ...]


class PrefixCache:
    """Prefix hash chain over KV blocks of ``block_size`` tokens, plus the LRU of evictable cached blocks."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._by_key: dict[int, int] = {}  # prefix key -> block id
        self._entries: dict[int, _Entry] = {}  # block id -> its key, parent key and tokens
        self._children: dict[int | None, set[int]] = {}  # parent key -> cached child block ids
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks with ref count 0, oldest first
        self.queried_tokens = 0
        self.hit_tokens = 0

    # -- lookup ---------------------------------------------------------------------------------------
    @staticmethod
    def key(parent: int | None, tokens: Sequence[int]) -> int:
        """Chain key of a block: stable in-process (hash of ints and tuples is not salted)."""
        return hash((parent, tuple(tokens)))

    def match(self, token_ids: Sequence[int], max_tokens: int | None = None) -> PrefixMatch:
        """Longest cached prefix of ``token_ids[:max_tokens]``, full blocks first, then a partial block."""
        bs = self.block_size
        limit = len(token_ids) if max_tokens is None else max(0, min(max_tokens, len(token_ids)))
        blocks: list[int] = []
        parent: int | None = None
        for start in range(0, limit - bs + 1, bs):
            chunk = tuple(token_ids[start : start + bs])
            block = self._by_key.get(self.key(parent, chunk))
            if block is None or self._entries[block].tokens != chunk:  # miss, or a hash collision
                break
            blocks.append(block)
            parent = self._entries[block].key
        src, extra = self._partial(parent, token_ids[len(blocks) * bs : limit])
        return PrefixMatch(blocks, src, len(blocks) * bs + extra)

    def _partial(self, parent: int | None, rest: Sequence[int]) -> tuple[int | None, int]:
        """The cached child of ``parent`` sharing the longest token prefix with ``rest`` (vectorised)."""
        children = self._children.get(parent)
        if not children or not rest:
            return None, 0
        ids = list(children)
        stored = np.array([self._entries[b].tokens for b in ids], dtype=np.int64)
        want = np.asarray(rest[: self.block_size], dtype=np.int64)
        same = np.cumprod(stored[:, : len(want)] == want[None, :], axis=1).sum(axis=1)
        best = int(np.argmax(same))
        if same[best] == 0:
            return None, 0
        return ids[best], int(same[best])

    # -- publishing verified blocks --------------------------------------------------------------------
    def publish(self, block_table: Sequence[int], token_ids: Sequence[int], num_tokens: int,
                keys: list[int]) -> None:
        """Hash the blocks of ``block_table`` that ``num_tokens`` verified tokens fill.

        ``keys`` is the request's list of chain keys of its blocks published so far; it is extended in place
        (the request keeps it, so publishing is incremental). A block whose prefix is already cached under
        another block id (computed twice concurrently) stays unpublished and is freed as usual.
        """
        bs = self.block_size
        full = min(num_tokens // bs, len(block_table))
        parent = keys[-1] if keys else None
        for i in range(len(keys), full):
            block = block_table[i]
            entry = self._entries.get(block)
            if entry is None:
                chunk = tuple(token_ids[i * bs : (i + 1) * bs])
                key = self.key(parent, chunk)
                if key not in self._by_key:
                    self._entries[block] = _Entry(key, parent, chunk)
                    self._by_key[key] = block
                    self._children.setdefault(parent, set()).add(block)
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
        siblings = self._children[entry.parent]
        siblings.discard(block)
        if not siblings:
            del self._children[entry.parent]
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
