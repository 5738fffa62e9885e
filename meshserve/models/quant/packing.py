"""Integers packed into int32 words, as GPTQ and AWQ store them: lane i of a word sits at bits [b*i, b*(i+1)).

``order`` says which column a lane holds within its word (AWQ interleaves: lane i holds column ORDER[i]);
None is the natural order (lane i holds column i). Both directions are vectorised over the whole tensor.
"""

from __future__ import annotations

import torch


def _lanes(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8 to pack into int32 words, got {bits}")
    return 32 // bits


def unpack_int32(
    packed: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None
) -> torch.Tensor:
    """int32 words -> int16 values in 0..2**bits - 1, `dim` growing 32 / bits times."""
    _lanes(bits)
    words = packed.movedim(dim, -1).to(torch.int32)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    values = (words[..., None] >> shifts) & ((1 << bits) - 1)  # [..., words, lane]; & undoes sign fill
    if order is not None:  # lane i holds column order[i]: put each lane in its column's place
        values = values[..., torch.argsort(torch.tensor(order))]
    return values.flatten(-2).to(torch.int16).movedim(-1, dim)


def pack_int32(
    values: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None
) -> torch.Tensor:
    """The inverse of unpack_int32: values in 0..2**bits - 1 along `dim` (a multiple of 32 / bits)."""
    lanes = _lanes(bits)
    v = values.movedim(dim, -1).to(torch.int64)
    if v.shape[-1] % lanes:
        raise ValueError(
            f"dimension {dim} ({v.shape[-1]}) must be a multiple of {lanes} to pack {bits}-bit values"
        )
    if bool(((v < 0) | (v >= 1 << bits)).any()):
        raise ValueError(f"values must lie in 0..{(1 << bits) - 1} to pack as {bits} bits")
    v = v.unflatten(-1, (-1, lanes))
    if order is not None:  # lane i takes column order[i]
        v = v[..., list(order)]
    word = (v << torch.arange(0, 32, bits)).sum(-1)  # disjoint bits: the sum is the bitwise or
    word = torch.where(word >= 1 << 31, word - (1 << 32), word)  # as a two's-complement int32
    return word.to(torch.int32).movedim(-1, dim)
