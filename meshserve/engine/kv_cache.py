"""Paged KV cache: the per-layer tensors (allocated once) and the block manager that hands out blocks.

Block ``b`` of layer ``l`` holds K at ``kv_caches[l][0, b]`` and V at ``kv_caches[l][1, b]``, each
``[block_size, num_kv_heads, head_dim]``; token ``t`` of a request lives in slot
``block_table[t // block_size] * block_size + t % block_size``.

Blocks are reference counted so that automatic prefix caching (issue 6) can share one block between
requests: a block returns to the free list only when its count drops to 0. Freed blocks join the
tail of the free list and are reused from the head, so the most recently freed blocks are reused
last (what an LRU prefix cache wants to keep).
"""

from __future__ import annotations

import math
from collections import deque

import torch

from meshserve.config import CacheConfig
from meshserve.engine.prefix_cache import PrefixCache, copy_blocks
from meshserve.engine.request import Request
from meshserve.errors import InputError
from meshserve.machine import available_memory


class BlockManager:
    """Ref-counted KV blocks with a free list, and the block tables of requests.

    With a ``prefix_cache``, blocks whose count drops to 0 but hold a cached prefix stay resident
    (evictable) instead of joining the free list; they count as free and are evicted, least recently
    released first, only when the free list is empty. ``kv_caches`` is needed for copy-on-write.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        prefix_cache: PrefixCache | None = None,
        kv_caches: list[torch.Tensor] | None = None,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.prefix_cache = prefix_cache
        self.kv_caches = kv_caches
        # LongRoPE: a sequence longer than this rotates all its keys the long way, so its blocks are not
        # the same KV as a short sequence's for the same tokens: it neither reuses nor publishes any.
        self.unshared_past: int | None = None

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out: the free list plus unreferenced cached blocks."""
        cache = self.prefix_cache
        return len(self.free_blocks) + (cache.num_evictable if cache is not None else 0)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def new_blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Blocks to add so that ``request`` can hold ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(request.block_table))

    def capacity(self, request: Request) -> int:
        """Most tokens ``request`` could hold using only free blocks."""
        return (len(request.block_table) + self.num_free_blocks) * self.block_size

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Grow ``request.block_table`` to hold ``num_tokens`` tokens; False (and no change) if short."""
        need = self.new_blocks_needed(request, num_tokens)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            request.block_table.append(self._take())
        return True

    def free(self, request: Request) -> None:
        """Drop the request's reference to each of its blocks (last block first) and clear its table."""
        for block in reversed(request.block_table):
            self._unref(block)
        request.block_table = []
        request.block_keys = []

    def _take(self) -> int:
        """A block at ref count 1: from the free list, else by evicting the oldest unreferenced cached one."""
        block = self.free_blocks.popleft() if self.free_blocks else self.prefix_cache.evict()
        assert block is not None and self.ref_counts[block] == 0, f"block {block} handed out while in use"
        self.ref_counts[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0 and self.prefix_cache is not None:
            self.prefix_cache.touch(block)  # no longer evictable
        self.ref_counts[block] += 1

    def _unref(self, block: int) -> None:
        count = self.ref_counts[block] - 1
        assert count >= 0, f"block {block} freed twice"
        self.ref_counts[block] = count
        if count == 0 and (self.prefix_cache is None or not self.prefix_cache.release(block)):
            self.free_blocks.append(block)

    # -- automatic prefix caching and speculative rollback --------------------------------------------

    def match_prefix(self, request: Request, budget: int | None = None) -> int | None:
        """Give a request that holds no blocks the longest cached prefix of its tokens; returns the tokens
        reused (its ``num_computed_tokens``). A partly matching block is copied (copy-on-write) into a
        fresh block. At least the last token is left to compute, so there is always a row to sample.

        With ``budget`` (tokens the request may compute this step): when the prefix plus that much work
        would not fit in the free blocks, return None and change nothing, so an admission that must fail
        makes no copy (it would redo it every step while it waits)."""
        cache = self.prefix_cache
        if cache is None or request.block_table or request.num_computed_tokens or request.needs_whole_prompt:
            return 0  # (prompt logprobs, pooling: pooling.py)
        if self.unshared_past is not None and request.num_tokens > self.unshared_past:
            return 0
        m = cache.match(request.token_ids, max_tokens=request.num_tokens - 1)
        if m.copy_src is not None and self.num_free_blocks - cache.num_pinned(m) < 1:
            m.copy_src, m.num_tokens = None, len(m.block_ids) * self.block_size  # no room for the copy
        if budget is not None:
            end = min(request.num_tokens, m.num_tokens + budget)
            if self.blocks_for(end) - len(m.block_ids) > self.num_free_blocks - cache.num_pinned(m):
                return None
        for block in m.block_ids:
            self._ref(block)
        request.block_table = list(m.block_ids)
        if m.copy_src is not None:
            self._ref(m.copy_src)  # so that taking the destination cannot evict the source
            dst = self._take()
            copy_blocks(self.kv_caches, [m.copy_src], [dst])
            self._unref(m.copy_src)
            request.block_table.append(dst)
        request.num_computed_tokens = m.num_tokens
        return m.num_tokens

    def record_prefix(self, request: Request, reused: int) -> None:
        """Count an admitted request's prompt tokens and those found cached (the hit rate statistic)."""
        if self.prefix_cache is not None:
            self.prefix_cache.record(request.num_tokens, reused)

    def publish(self, request: Request) -> None:
        """Add the request's newly filled blocks of verified, computed tokens to the prefix cache."""
        long = self.unshared_past is not None and request.num_tokens > self.unshared_past
        if self.prefix_cache is not None and not long:
            # A verify that stopped early has KV past its last kept token: publish only kept tokens.
            num_tokens = min(request.num_computed_tokens, request.num_tokens)
            self.prefix_cache.publish(request.block_table, request.token_ids, num_tokens, request.block_keys)

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Keep only the blocks holding the first ``num_tokens`` tokens (rejected drafts' tail blocks go)."""
        keep = self.blocks_for(num_tokens)
        for block in reversed(request.block_table[keep:]):
            self._unref(block)
        del request.block_table[keep:]


def block_bytes(
    num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, parts: int = 2
) -> int:
    """Bytes of K and V for one block across all layers (parts=1: keys that are also values, MLA's latent)."""
    return parts * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def num_kv_blocks(
    cache: CacheConfig,
    per_block: int,
    max_model_len: int,
    max_num_seqs: int,
    available: int | None = None,
    reserved: int = 0,
) -> int:
    """How many blocks to allocate, checked to hold at least one request of ``max_model_len`` tokens and
    to fit in ``available`` bytes (the device's free memory; default: this host's available memory).

    ``reserved``: bytes of KV that live outside the blocks (the draft model's own cache, at its largest);
    they come out of the KV budget (``kv_cache_memory`` or the fraction of free memory) and must fit beside
    the blocks."""
    available = available_memory() if available is None else available
    blocks_per_seq = math.ceil(max_model_len / cache.block_size)
    if cache.num_kv_blocks is not None:
        blocks, field = cache.num_kv_blocks, "num_kv_blocks"
    elif cache.kv_cache_memory is not None:
        blocks, field = (int(cache.kv_cache_memory * (1 << 30)) - reserved) // per_block, "kv_cache_memory"
    else:
        budget = int(available * cache.kv_cache_fraction) - reserved
        blocks, field = min(budget // per_block, blocks_per_seq * max_num_seqs), "kv_cache_memory"
    gib = 1 << 30
    draft = f" beside the draft model's KV ({reserved / gib:.3f} GiB)" if reserved else ""
    most = max(0, available - reserved) // per_block
    if blocks > most:
        raise InputError(
            field,
            f"{blocks} KV blocks need {blocks * per_block / gib:.3f} GiB{draft}, more than "
            f"the {available / gib:.3f} GiB the device has available; "
            f"allowed: at most {most} blocks",
        )
    if blocks < blocks_per_seq:
        need = blocks_per_seq * per_block / gib
        raise InputError(
            field,
            f"{max(blocks, 0)} KV blocks{draft} cannot hold one request of max_model_len="
            f"{max_model_len} tokens; need >= {blocks_per_seq} blocks ({need:.3f} GiB) "
            f"or a smaller max_model_len",
        )
    return blocks


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    parts: int = 2,
) -> list[torch.Tensor]:
    """One zeroed ``[parts, num_blocks, block_size, num_kv_heads, head_dim]`` tensor per layer: K and V, or
    (parts=1) one latent row per token whose keys are also its values (MLA).

    Zeroing touches every page now, so resident memory does not creep up while serving.
    """
    shape = (parts, num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
