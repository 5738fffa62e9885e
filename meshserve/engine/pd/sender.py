"""The prefill side of a transfer: offer a handed-off request, send the blocks the decode side lacks, free.

One transfer (``seq``): offer (generation, Handoff) -> the decode side replies with the leading blocks it
already holds, None when it has no room now, or CANCELLED when the request was aborted (nothing is sent;
the blocks are freed here) -> one send of the other blocks -> its ack. A failure
or timeout starts a new generation (link.py) and the transfer is tried once more; after a second failure
the request is failed with the reason. Either way the prefill side frees the request's blocks, except while
the decode side is full (the request waits for a later try, blocks held).
"""

from __future__ import annotations

import logging
import time

from meshserve import switches
from meshserve.engine.engine import Engine
from meshserve.engine.pd import kv_blocks
from meshserve.engine.pd.handoff import Handoff
from meshserve.engine.pd.link import KVLink, TransferError
from meshserve.engine.pd.receiver import CANCELLED
from meshserve.engine.pd.stats import TransferStats
from meshserve.engine.request import Request

logger = logging.getLogger(__name__)
ATTEMPTS = 2


class Sender:
    def __init__(self, engine: Engine, link: KVLink, stats: TransferStats | None = None) -> None:
        self.engine, self.link = engine, link
        self.stats = TransferStats() if stats is None else stats
        self.seq = 0
        self.generation = 0
        self._stalled = False

    def transfer(self, request: Request) -> bool:
        """Move one handed-off request: True once the decode side holds it or dropped it, aborted (blocks
        freed here either way), False when
        the decode side has no room now (blocks kept: try later). TransferError after the last attempt
        failed, its blocks freed."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                moved = self._once(request)
            except TransferError as err:
                self.stats.failures += 1
                self.generation += 1  # a fresh gloo group: the failed one may have closed its pair
                logger.warning("request %s: transfer attempt %d failed: %s", request.request_id, attempt, err)
                if attempt == ATTEMPTS:
                    self.engine.release(request)
                    raise TransferError(
                        f"KV transfer to the decode instance failed {ATTEMPTS} times, last: {err}"
                    ) from None
                continue
            if moved:
                self.engine.release(request)
            return moved
        raise AssertionError("unreachable")

    def _once(self, request: Request) -> bool:
        seq, self.seq = self.seq, self.seq + 1
        start = time.perf_counter()
        handoff = Handoff.of(request, self.engine.blocks.block_size)
        self.link.put("offer", seq, (self.generation, handoff))
        try:
            held = self.link.wait("reply", seq)
        except TransferError:
            self.link.put("cancel", seq, None)  # should the decode side get to it late, it skips it
            raise
        if held is None:
            return False
        if held == CANCELLED:
            self.stats.cancelled += 1
            return True
        blocks = request.block_table[held : handoff.num_blocks]
        nbytes = 0
        if blocks:
            data = kv_blocks.gather(self.engine.kv_caches, blocks)
            self.link.group(
                self.generation
            )  # formed with the decode side's, so a stall below is mid-transfer
            if switches.value("MESHSERVE_PD_FAULT") == "stall:send" and not self._stalled:
                self._stalled = True
                time.sleep(self.link.timeout_s * 1.5)
            self.link.send(data, self.generation, seq)
            nbytes = data.numel() * data.element_size()
        error = self.link.wait("ack", seq)
        if error is not None:
            raise TransferError(f"the decode side could not take it: {error}")
        self.stats.record(len(blocks), held, nbytes, time.perf_counter() - start)
        return True
