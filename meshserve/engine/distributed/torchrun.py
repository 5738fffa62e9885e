"""Ranks started by ``torchrun`` (one or several hosts): commands travel over torch.distributed.

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-endpoint HOST:29500 \\
        -m meshserve generate --model DIR --prompt-file P --data-parallel-size 8 --enable-expert-parallel

Every rank runs the same command. Rank 0 runs the front door (LLM, ``meshserve generate`` / ``serve``)
and rank 0's engine in one process; every other rank's ``LLM(...)`` never returns: it answers rank 0's
commands and leaves the process (exit 0) when rank 0 closes. The ranks rendezvous through torchrun's
environment (env://). Commands are pickled objects broadcast from rank 0 on a gloo group of their own;
the answers come back by a gather on it. Rank 0 bounds every wait (``step_timeout_s``); a rank waits for
its next command as long as the server idles, and leaves when rank 0's connection closes. When any rank
exits with an error, torchrun stops the others (no orphans).

Shutdown is rank 0's: torchrun passes SIGTERM / Ctrl-C to every rank at once, and the other ranks only note
it, so rank 0 stops accepting, drains, then closes them; all exit 0 (torchrun kills whatever is left after
its own shutdown timeout). A rank whose rank 0 vanished without closing it says so in one line, exit 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from meshserve.engine.distributed.ranks import answer, fail
from meshserve.engine.distributed.worker import RankSpec, injected_fault, join, start_worker

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
IDLE_TIMEOUT = timedelta(days=7)  # a rank's wait for its next command: the server may idle for long
CLOSE_TIMEOUT = timedelta(seconds=60)
SLOW_CLOSE_S = 12.0  # the "close:0" drill: longer than the server's 10 s wait for its engine to close

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch (from torchrun's environment variables)."""

    rank: int
    world_size: int
    local_rank: int  # this rank's place on its host (its GPU)
    local_world_size: int  # ranks on this host: they share its cores (and GPUs)


def torchrun_launch() -> Launch | None:
    """The launch this process is part of, or None when torchrun did not start it."""
    if not all(name in os.environ for name in ENV_VARS):
        return None
    return Launch(*(int(os.environ[name]) for name in ENV_VARS[:4]))


class Channel:
    """Pickled objects from rank 0 to every rank (broadcast) and back (gather), on a gloo group."""

    def __init__(self, spec: RankSpec) -> None:
        join(spec)  # first on every rank, so every rank creates its groups in the same order
        self.group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.rank, self.world_size = spec.rank, spec.world_size
        self._size = torch.zeros(1, dtype=torch.int64)
        self._header: dist.Work | None = None

    def send(self, obj: Any, timeout: timedelta) -> None:
        """Rank 0: ``obj`` to every other rank."""
        payload = _tensor(obj)
        self._size[0] = len(payload)
        dist.broadcast(self._size, 0, group=self.group, async_op=True).wait(timeout)
        dist.broadcast(payload, 0, group=self.group, async_op=True).wait(timeout)

    def post(self) -> dist.Work:
        """Other ranks: start waiting for the next object; ``is_completed()`` says it is arriving."""
        self._header = dist.broadcast(self._size, 0, group=self.group, async_op=True)
        return self._header

    def receive(self) -> Any:
        """Other ranks: the object rank 0 sends next (after ``post``)."""
        self._header.wait()
        payload = torch.empty(int(self._size[0]), dtype=torch.uint8)
        dist.broadcast(payload, 0, group=self.group)
        return pickle.loads(payload.numpy().tobytes())

    def close(self) -> None:
        """Drop this rank's references to the group once it is destroyed: gloo's worker and socket threads
        end with its last reference, and a process that still holds one at exit aborts in C++ while the
        interpreter shuts down (terminate called without an active exception)."""
        self.group = self._header = None

    def gather(self, obj: Any, timeout: timedelta | None = None) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order); None on the other ranks."""
        payload = _tensor(obj)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        _wait(dist.all_gather(sizes, torch.tensor([len(payload)]), group=self.group, async_op=True), timeout)
        longest = int(max(sizes))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: len(payload)] = payload
        into = [torch.empty(longest, dtype=torch.uint8) for _ in sizes] if self.rank == 0 else None
        _wait(dist.gather(padded, into, dst=0, group=self.group, async_op=True), timeout)
        if into is None:
            return None
        return [pickle.loads(t[: int(n)].numpy().tobytes()) for t, n in zip(into, sizes, strict=True)]


def _tensor(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _wait(work: dist.Work, timeout: timedelta | None) -> None:
    if timeout is None:
        work.wait()
    else:
        work.wait(timeout)


class TorchrunRanks:
    """Rank 0's side of a torchrun launch: its own engine here, the others behind a Channel."""

    def __init__(self, spec: RankSpec) -> None:
        self.num_ranks = spec.world_size
        self._closed = False
        self.channel = Channel(spec)
        self.worker, self._start = start_worker(spec)  # a failure is reported with every other rank's start

    @property
    def closed(self) -> bool:
        return self._closed

    def started(self, timeout_s: float) -> list[Any]:
        """Every rank's worker.Started once all have built their engines."""
        return self._answers(list(range(self.num_ranks)), "start", self._start, timeout_s)

    def ask(self, ranks: list[int], command: str, args: tuple, timeout_s: float) -> list[Any]:
        try:
            self.channel.send((command, args, ranks), timedelta(seconds=timeout_s))
        except RuntimeError as err:  # a rank died, or missed the deadline
            fail(self, f"the ranks did not take {command} ({err})")
        mine = self.worker.reply(command, args) if 0 in ranks else ("ok", None)
        values = self._answers(ranks, command, mine, timeout_s)
        if command == "step":
            # Rank 0 runs the front door too, so its next step follows at once: its copies always run into
            # it, and it proposes the smallest budget (bytes / step_interval): spread thin, never bunched.
            self.worker.between_steps(lambda: True)
        return values

    def _answers(self, ranks: list[int], command: str, mine: tuple[str, Any], timeout_s: float) -> list[Any]:
        try:
            replies = self.channel.gather(mine, timedelta(seconds=timeout_s))
        except RuntimeError as err:
            fail(self, f"the ranks did not answer {command} within {timeout_s:.0f} s ({err})")
        return [answer(self, rank, command, replies[rank]) for rank in ranks]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if injected_fault("close", 0):
            time.sleep(SLOW_CLOSE_S)
        try:
            self.channel.send(("close", (), []), CLOSE_TIMEOUT)
            self.channel.gather(("ok", None), CLOSE_TIMEOUT)
        except RuntimeError as err:  # torchrun signals every rank at once (SIGTERM, Ctrl-C): they are gone
            logger.warning(
                "the other ranks had stopped before rank 0 closed them (%s)", str(err).splitlines()[0][:200]
            )
        finally:
            self.worker.close()
            self.channel.close()

    def kill(self) -> None:
        """Stop serving here and drop the groups: the other ranks see rank 0's connections close and leave
        (and torchrun stops them when rank 0's process fails)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):  # best effort: a group may be half-way through an op
                dist.destroy_process_group()
            self.channel.close()


def serve_rank(spec: RankSpec) -> None:
    """A rank other than 0: build the engine, then answer rank 0's commands until ``close``."""
    _wait_for_rank_0_on_signals(spec.rank)
    try:
        _serve(spec)
    except RuntimeError as err:  # torch.distributed's: rank 0's connections closed without a "close"
        logger.warning("rank %d: rank 0 is gone; leaving (%s)", spec.rank, str(err).splitlines()[0][:200])
        raise SystemExit(1) from None


def _wait_for_rank_0_on_signals(rank: int) -> None:
    """SIGTERM / SIGINT reach every rank at once; this one stays until rank 0 has drained and closes it."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread

    def noted(signum: int, frame: object) -> None:
        logger.warning("rank %d: %s: rank 0 drains, then closes this rank", rank, signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, noted)


def _serve(spec: RankSpec) -> None:
    channel = Channel(spec)
    worker, start = start_worker(spec)  # a failure: rank 0 reports it and stops
    channel.gather(start)
    if worker is None:
        raise SystemExit(1)
    channel.post()
    while True:
        command, args, ranks = channel.receive()
        if command == "close":
            channel.gather(("ok", None))
            worker.close()
            channel.close()
            return
        reply = worker.reply(command, args) if spec.rank in ranks else ("ok", None)
        channel.gather(reply)
        pending = channel.post()
        if command == "step" and reply[0] == "ok":
            worker.between_steps(pending.is_completed)
