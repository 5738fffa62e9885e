"""How the front end talks to its ranks: one interface, two transports.

- processes.py: rank processes the engine spawns itself, one pipe each (one host);
- torchrun.py: ranks started by ``torchrun`` (one or several hosts); rank 0 runs the front end and
  rank 0's engine in one process, and commands travel over torch.distributed.

Either way a command goes to some ranks and each answers ("ok", value) or ("error", portable error);
a rank that dies or misses its deadline stops every rank and raises RankError.
"""

from __future__ import annotations

from typing import Any, Protocol

from meshserve.errors import InputError


class RankError(RuntimeError):
    """A rank failed to start, died, or stopped answering; all ranks have been shut down."""


class Ranks(Protocol):
    """The ranks behind a DistributedEngine."""

    num_ranks: int

    @property
    def closed(self) -> bool: ...

    def started(self, timeout_s: float) -> list[Any]:
        """Every rank's answer to starting (worker.Started) once all have built their engines."""
        ...

    def ask(self, ranks: list[int], command: str, args: tuple, timeout_s: float) -> list[Any]:
        """Every listed rank's answer to ``command`` (errors raised as ``answer`` raises them)."""
        ...

    def close(self) -> None:
        """Ask every live rank to finish, then make sure none is left running."""
        ...

    def kill(self) -> None:
        """Stop every rank at once (one may be stuck in a collective)."""
        ...


def answer(ranks: Ranks, rank: int, command: str, reply: tuple[str, Any]) -> Any:
    """The value of one rank's reply. InputError from ``add`` passes through and the ranks serve on; any
    other error stops every rank first (InputError at start: the ranks never served)."""
    kind, value = reply
    if kind != "error":
        return value
    if value[0] == "input":
        if command != "add":
            ranks.kill()
        raise InputError(value[1], value[2])
    fail(ranks, f"rank {rank} failed during {command}: {value[-1]}")


def fail(ranks: Ranks, message: str) -> None:
    ranks.kill()
    raise RankError(f"{message}; all {ranks.num_ranks} ranks have been shut down")
