"""One live expert migration: a schedule of small copies that every rank walks in the same order.

The schedule lists each part (gate_up, down) of each replica of the new placement, cut into chunks
of ``chunk_bytes``: a replica a rank keeps is copied locally from its current slot; a new replica is
sent point-to-point by its source rank (on the side process group) straight into the new slot, so no
byte is staged or copied twice. The new slots are allocated aside; the current ones keep serving.

``advance(budget)`` runs the next ``budget`` bytes of the schedule, each rank only the chunks it takes
part in. Every rank advances the same cursor by the same budget (agreed at the step before), so all
reach the end together and switch at the same step boundary without asking each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from meshserve.engine.distributed.expert_parallel import ExpertParallel, Prepared
from meshserve.engine.distributed.worker import injected_fault
from meshserve.placement import Migrations


@dataclass(frozen=True)
class Chunk:
    """Elements [start, stop) of one part of expert ``expert`` in MoE layer ``layer``, from ``src`` to
    ``dst`` (the same rank: a local copy of a kept replica)."""

    layer: int
    expert: int
    src: int
    dst: int
    part: int
    start: int
    stop: int


class Migration:
    """The copies that build placement ``target`` on this rank, run a budget at a time."""

    def __init__(
        self,
        target: np.ndarray,
        moves: Migrations,
        ep: ExpertParallel,
        group: dist.ProcessGroup,
        chunk_bytes: int,
        timeout_s: float,
    ) -> None:
        self.ep, self.group, self.rank = ep, group, ep.rank
        self.timeout = timedelta(seconds=timeout_s)
        self.new: Prepared = ep.allocate(target)
        self.element_size = ep.layers[0].local.element_size  # 1: quantized slots move as bytes
        self.chunks = self._schedule(target, moves, max(1, chunk_bytes // self.element_size))
        # The busiest rank's share of the schedule, counted as advance() counts a gap's load: every replica
        # of the target loads its rank (a local copy, once), a moved one its source rank as well.
        layer_bytes = self.element_size * np.array([sum(local.part_sizes()) for local in self.new.local])
        remote = moves.src != moves.dst
        per_rank = (target * layer_bytes[:, None, None]).sum(axis=(0, 1)) + np.bincount(
            moves.src[remote], weights=layer_bytes[moves.layer[remote]], minlength=target.shape[2]
        )
        self.max_rank_bytes = float(per_rank.max(initial=0.0))
        self.cursor = 0
        self.moved_bytes = 0  # by this rank: sent, received or copied locally
        self.busy_s = 0.0  # time this rank spent in advance()

    def _schedule(self, target: np.ndarray, moves: Migrations, chunk: int) -> list[Chunk]:
        source = {
            (layer, e, d): s
            for layer, e, s, d in zip(
                *(m.tolist() for m in (moves.layer, moves.expert, moves.src, moves.dst)), strict=True
            )
        }
        chunks = []
        for layer, expert, rank in np.argwhere(target).tolist():  # a few hundred replicas: plan time only
            sizes = self.new.local[layer].part_sizes()
            src = source.get((layer, expert, rank), rank)
            chunks += [
                Chunk(layer, expert, src, rank, part, start, min(start + chunk, size))
                for part, size in enumerate(sizes)
                for start in range(0, size, chunk)
            ]
        return chunks

    @property
    def done(self) -> bool:
        return self.cursor == len(self.chunks)

    def advance(self, budget_bytes: float) -> None:
        """Run the next chunks, at least one, until some rank would move more than ``budget_bytes``
        (every rank computes the same cut: it knows every rank's chunks).

        Raises what a send or receive raises (a peer that does not answer within the timeout)."""
        start, works = time.perf_counter(), []
        load = np.zeros(self.ep.holds.shape[2])  # bytes each rank moves in this call
        while not self.done:
            c = self.chunks[self.cursor]
            size = (c.stop - c.start) * self.element_size
            ranks = [c.src, c.dst]
            if load.any() and (load[ranks] + size).max() > budget_bytes:
                break
            self.cursor += 1
            load[ranks] += size
            if self.rank not in ranks:
                continue
            self.moved_bytes += size
            if c.src == c.dst:
                self._into(c).copy_(self._from(c))
            elif self.rank == c.src:
                if not injected_fault("stall", self.rank):
                    works.append(dist.isend(self._from(c), c.dst, group=self.group))
            else:
                works.append(dist.irecv(self._into(c), c.src, group=self.group))
        for work in works:
            work.wait(self.timeout)
        self.busy_s += time.perf_counter() - start

    def _from(self, c: Chunk) -> torch.Tensor:
        return self.ep.parts(c.layer, c.expert)[c.part][c.start : c.stop]

    def _into(self, c: Chunk) -> torch.Tensor:
        return self.new.parts(c.layer, c.expert, self.rank)[c.part][c.start : c.stop]
