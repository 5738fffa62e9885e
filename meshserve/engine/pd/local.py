"""Both roles in one process: a prefill engine's handed-off requests move into a decode engine by a copy.

The same steps as a transfer between processes (receiver.py / sender.py) without the transport: the decode
side allocates and says which blocks it holds, only the others are copied, the prefill side frees.
"""

from __future__ import annotations

from meshserve.engine.engine import Engine
from meshserve.engine.pd import kv_blocks
from meshserve.engine.pd.handoff import Handoff, allocate, land


def move(prefill: Engine, decode: Engine) -> int:
    """Move every handed-off request that fits the decode engine's free blocks; returns the blocks copied."""
    copied = 0
    for request in list(prefill.handoffs):
        handoff = Handoff.of(request, prefill.blocks.block_size)
        got = allocate(decode, handoff)
        if got is None:
            break  # the decode engine is full: the rest wait, in order
        target, held = got
        data = kv_blocks.gather(prefill.kv_caches, request.block_table[held : handoff.num_blocks])
        kv_blocks.scatter(decode.kv_caches, target.block_table[held : handoff.num_blocks], data)
        land(decode, target)
        prefill.release(request)
        copied += handoff.num_blocks - held
    return copied
