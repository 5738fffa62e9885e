"""Rank processes started by the engine itself (torch.multiprocessing spawn), one pipe each.

Every wait has a deadline and checks that the ranks are alive, so a rank that fails to start or dies
mid-step is seen at once; the finalizer terminates any rank still running (no orphans).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any

import torch.multiprocessing as mp

from meshserve.engine.distributed.ranks import answer, fail
from meshserve.engine.distributed.worker import RankSpec, run_rank

POLL_S = 0.5  # how often a wait checks that the ranks are alive


class SpawnedRanks:
    """N spawned rank processes joined by a gloo group that rendezvouses through a temporary file."""

    def __init__(self, spec: RankSpec) -> None:
        """Starts ranks 0..spec.world_size-1 from ``spec`` (its rank and rendezvous are set per process)."""
        self.num_ranks = n = spec.world_size
        store = tempfile.NamedTemporaryFile(prefix="meshserve-ep-", delete=False)  # noqa: SIM115
        store.close()
        os.unlink(store.name)  # the file store creates it; it must not exist yet
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self._finalizer = weakref.finalize(self, _kill, self.procs, store.name)
        for rank in range(n):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=run_rank,
                args=(spec.for_rank(rank, f"file://{store.name}"), theirs),
                daemon=True,
                name=f"meshserve-rank{rank}",
            )
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(ours)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def started(self, timeout_s: float) -> list[Any]:
        """Every rank's worker.Started once all have built their engines."""
        return self.replies(list(range(self.num_ranks)), "start", timeout_s)

    def ask(self, ranks: list[int], command: str, args: tuple, timeout_s: float) -> list[Any]:
        for rank in ranks:
            try:
                self.conns[rank].send((command, args))
            except OSError:
                self._exited(rank, f"before {command}")
        return self.replies(ranks, command, timeout_s)

    def replies(self, ranks: list[int], command: str, timeout_s: float) -> list[Any]:
        """Each rank's answer, waiting on all at once so the first failure is seen first."""
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(answers) < len(ranks):
            waiting = {self.conns[r]: r for r in ranks if r not in answers}
            for conn in wait(list(waiting), timeout=POLL_S):
                rank = waiting[conn]
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    self._exited(rank, f"during {command}")
                answers[rank] = answer(self, rank, command, reply)
            for rank in ranks:
                if rank not in answers and not self.procs[rank].is_alive() and not self.conns[rank].poll():
                    self._exited(rank, f"during {command}")
            if time.monotonic() > deadline:
                late = [r for r in ranks if r not in answers]
                fail(self, f"ranks {late} did not answer {command} within {timeout_s:.0f} s")
        return [answers[r] for r in ranks]

    def _exited(self, rank: int, when: str) -> None:
        self.procs[rank].join(1.0)
        fail(self, f"rank {rank} exited (code {self.procs[rank].exitcode}) {when}")

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs, strict=True):
            if proc.is_alive():
                with contextlib.suppress(OSError):  # a rank that just died
                    conn.send(("close", ()))
        deadline = time.monotonic() + 10.0
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        self._finalizer()


def _kill(procs: list[Any], store: str) -> None:
    """Terminate (then kill) ranks still running, and remove the rendezvous file."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)
    if os.path.exists(store):
        os.unlink(store)
