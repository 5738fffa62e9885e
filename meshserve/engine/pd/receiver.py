"""The decode side of a transfer: between its steps, take the prefill side's offers in order, allocate, say
which leading blocks the prefix cache already holds, receive the rest in one tensor, and continue the
request. A receive that fails or times out frees the blocks it allocated and tells the prefill side."""

from __future__ import annotations

import logging
import os
import time

import torch

from meshserve import switches
from meshserve.engine.engine import Engine
from meshserve.engine.pd import kv_blocks
from meshserve.engine.pd.handoff import Handoff, allocate, land
from meshserve.engine.pd.link import KVLink, TransferError
from meshserve.engine.pd.stats import TransferStats
from meshserve.errors import InputError

logger = logging.getLogger(__name__)


class Receiver:
    def __init__(self, engine: Engine, link: KVLink, stats: TransferStats | None = None) -> None:
        self.engine, self.link = engine, link
        self.stats = TransferStats() if stats is None else stats
        self.seq = 0

    def poll(self) -> int:
        """Take every offer waiting now; returns how many requests joined the engine."""
        joined = 0
        while True:
            found, offer = self.link.take("offer", self.seq)
            if not found:
                return joined
            seq, self.seq = self.seq, self.seq + 1
            joined += self._accept(seq, *offer)

    def _accept(self, seq: int, generation: int, handoff: Handoff) -> bool:
        if self.link.take("cancel", seq)[0]:
            return False  # the prefill side gave up on this offer (and tries again under a new seq)
        start = time.perf_counter()
        got = allocate(self.engine, handoff)
        if got is None:
            self.link.put("reply", seq, None)  # full: the prefill side keeps it and offers it again later
            return False
        request, held = got
        self.link.put("reply", seq, held)
        blocks = request.block_table[held : handoff.num_blocks]
        try:
            if blocks:
                data = torch.empty(kv_blocks.shape(self.engine.kv_caches, len(blocks)), dtype=self._dtype)
                if switches.value("MESHSERVE_PD_FAULT") == "die:recv":
                    os._exit(17)  # the drill: this process dies in the middle of a transfer
                self.link.recv(data, generation, seq)
                kv_blocks.scatter(self.engine.kv_caches, blocks, data)
            land(self.engine, request)
        except (TransferError, InputError) as err:
            self.engine.blocks.free(request)
            self.stats.failures += 1
            logger.warning("request %s: transfer %d failed: %s", handoff.request_id, seq, err)
            self.link.put("ack", seq, str(err))
            return False
        self.link.put("ack", seq, None)
        nbytes = kv_blocks.nbytes(self.engine.kv_caches, len(blocks))
        self.stats.record(len(blocks), held, nbytes, time.perf_counter() - start)
        return True

    @property
    def _dtype(self) -> torch.dtype:
        return self.engine.kv_caches[0].dtype
