"""Whole KV blocks as one contiguous tensor: what one transfer sends, in one send, for every layer at once.

``gather(kv_caches, blocks)`` is ``[layers, parts, len(blocks), block_size, kv_heads, head_dim]``;
``scatter`` writes such a tensor into (other) blocks of a cache with the same layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def shape(kv_caches: Sequence[torch.Tensor], num_blocks: int) -> tuple[int, ...]:
    """The shape of ``num_blocks`` gathered blocks."""
    parts, _, *block = kv_caches[0].shape
    return (len(kv_caches), parts, num_blocks, *block)


def gather(kv_caches: Sequence[torch.Tensor], blocks: Sequence[int]) -> torch.Tensor:
    """Blocks ``blocks`` of every layer, copied into one contiguous tensor."""
    index = torch.tensor(list(blocks), dtype=torch.long, device=kv_caches[0].device)
    return torch.stack([kv.index_select(1, index) for kv in kv_caches])


def scatter(kv_caches: Sequence[torch.Tensor], blocks: Sequence[int], data: torch.Tensor) -> None:
    """Write gathered ``data`` into blocks ``blocks`` of every layer."""
    index = torch.tensor(list(blocks), dtype=torch.long, device=kv_caches[0].device)
    for layer, kv in enumerate(kv_caches):
        kv.index_copy_(1, index, data[layer])


def nbytes(kv_caches: Sequence[torch.Tensor], num_blocks: int) -> int:
    """Bytes that ``num_blocks`` blocks take on the wire."""
    return num_blocks * sum(kv[:, 0].numel() * kv.element_size() for kv in kv_caches)
