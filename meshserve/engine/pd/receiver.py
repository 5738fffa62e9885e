"""The decode side of a transfer: between its steps, take the prefill side's offers in order, allocate, say
which leading blocks the prefix cache already holds, receive the rest in one tensor, and continue the
request. A receive that fails or times out frees the blocks it allocated and tells the prefill side. An
offer of a request the caller aborted before it got here is answered CANCELLED: nothing is allocated or
sent, and the prefill side frees its blocks."""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict

import torch

from meshserve import switches
from meshserve.engine.engine import Engine
from meshserve.engine.pd import kv_blocks
from meshserve.engine.pd.handoff import Handoff, allocate, land
from meshserve.engine.pd.link import KVLink, TransferError
from meshserve.engine.pd.stats import TransferStats
from meshserve.errors import InputError

logger = logging.getLogger(__name__)
CANCELLED = "cancelled"  # the reply to an offer of an aborted request
KEPT = 4096  # aborted ids remembered for offers still to come
HOLD_S = (
    1.0  # the drills: how long "hold:offer" leaves an offer in the store ("stall:recv" stalls twice that)
)


class Cancelled(OrderedDict):
    """Ids of requests aborted before their offer arrived (the oldest forgotten past KEPT)."""

    def add(self, request_id: str) -> None:
        self[request_id] = None
        while len(self) > KEPT:
            self.popitem(last=False)


class Receiver:
    def __init__(
        self,
        engine: Engine,
        link: KVLink,
        stats: TransferStats | None = None,
        cancelled: Cancelled | None = None,
    ) -> None:
        self.engine, self.link = engine, link
        self.stats = TransferStats() if stats is None else stats
        self.cancelled = Cancelled() if cancelled is None else cancelled
        self.seq = 0
        self._seen: dict[int, float] = {}  # the drill: when each held offer was first seen

    def poll(self) -> int:
        """Take every offer waiting now; returns how many requests joined the engine."""
        joined = 0
        while True:
            if self._held():
                return joined
            found, offer = self.link.take("offer", self.seq)
            if not found:
                return joined
            seq, self.seq = self.seq, self.seq + 1
            joined += self._accept(seq, *offer)

    def _accept(self, seq: int, generation: int, handoff: Handoff) -> bool:
        if self.link.take("cancel", seq)[0]:
            return False  # the prefill side gave up on this offer (and tries again under a new seq)
        if handoff.request_id in self.cancelled:  # aborted on its way here: no blocks, no decode steps
            del self.cancelled[handoff.request_id]
            self.stats.cancelled += 1
            self.link.put("reply", seq, CANCELLED)
            return False
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
                fault = switches.value("MESHSERVE_PD_FAULT")
                if fault == "die:recv":
                    os._exit(17)  # the drill: this process dies in the middle of a transfer
                if fault == "stall:recv":
                    time.sleep(2 * HOLD_S)  # the drill: a slow transfer
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

    def _held(self) -> bool:
        """The drill "hold:offer" (a slow decode side): an offer waits HOLD_S in the store before it is
        taken."""
        if switches.value("MESHSERVE_PD_FAULT") != "hold:offer" or not self.link.store.check(
            [f"offer/{self.seq}"]
        ):
            return False
        return time.monotonic() - self._seen.setdefault(self.seq, time.monotonic()) < HOLD_S

    @property
    def _dtype(self) -> torch.dtype:
        return self.engine.kv_caches[0].dtype
