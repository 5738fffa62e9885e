"""The transport between a prefill process (rank 0) and a decode process (rank 1), all torch.distributed.

With N prefill and M decode instances every (prefill, decode) pair has its own link: one store for all
(``open_store``; instance ranks 0..N-1 prefill, N..N+M-1 decode), each pair's keys and gloo groups under
its own prefix ("pair/P/D"), so a pair is exactly the one-to-one case: point to point, nothing shared.

Control messages (offers, replies, acks: small, picklable) go through the rendezvous store, where the decode
side can look for them between its steps without blocking. The KV goes through a gloo group, one send of one
contiguous tensor per transfer (kv_blocks.py), posted only once both sides know it is due.

A gloo wait that times out closes its pair for good ("Application timeout caused pair closure"), and the
other side's next op on it fails ("Connection closed by peer"). So a group serves one *generation*: the
prefill side starts a new one after any failed transfer and names it in every offer, and each side builds
that generation's group (a rendezvous under its own store prefix) when it first meets it.

Rendezvous: file://PATH (one host), tcp://HOST:PORT or env:// (MASTER_ADDR, MASTER_PORT; the prefill side
hosts the store). Both sides trust each other: messages are pickled.
"""

from __future__ import annotations

import os
import pickle
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from meshserve.errors import InputError

PREFILL, DECODE = 0, 1
POLL_S = 0.001


class TransferError(RuntimeError):
    """A transfer failed or timed out; the side that raises it has freed what it allocated for it."""


class KVLink:
    """One side of a prefill/decode pair: a store for messages, a gloo group per generation for the KV."""

    def __init__(self, store: dist.Store, rank: int, timeout_s: float) -> None:
        self.store, self.rank, self.timeout_s = store, rank, timeout_s
        self.peer = 1 - rank
        self.generation: int | None = None
        self._group: Any = None
        self._retired: list[Any] = []  # failed groups: dropped only at close (gloo pairs may be mid-teardown)

    @classmethod
    def connect(cls, init_method: str, rank: int, timeout_s: float) -> KVLink:
        """Meet the other side of a lone pair at ``init_method``; waits up to ``timeout_s`` for it."""
        return cls(open_store(init_method, rank, 2, timeout_s), rank, timeout_s)

    @classmethod
    def pair(cls, store: dist.Store, prefill: int, decode: int, rank: int, timeout_s: float) -> KVLink:
        """The link between prefill instance ``prefill`` and decode instance ``decode`` over a shared store;
        ``rank``: this side (PREFILL or DECODE)."""
        return cls(dist.PrefixStore(f"pair/{prefill}/{decode}", store), rank, timeout_s)

    # -- control messages ---------------------------------------------------------------------------

    def put(self, kind: str, seq: int, value: object) -> None:
        self.store.set(f"{kind}/{seq}", pickle.dumps(value))

    def take(self, kind: str, seq: int) -> tuple[bool, Any]:
        """(True, message) and the message is gone from the store, or (False, None) when none is there."""
        key = f"{kind}/{seq}"
        if not self.store.check([key]):
            return False, None
        value = pickle.loads(self.store.get(key))
        self.store.delete_key(key)
        return True, value

    def wait(self, kind: str, seq: int) -> Any:
        """The message, waiting up to the timeout; TransferError when it does not come."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            found, value = self.take(kind, seq)
            if found:
                return value
            if time.monotonic() > deadline:
                raise TransferError(f"no {kind} for transfer {seq} within {self.timeout_s:g} s")
            time.sleep(POLL_S)

    # -- the KV ---------------------------------------------------------------------------------------

    def send(self, data: torch.Tensor, generation: int, tag: int) -> None:
        self._wait(lambda g: g.send([data], self.peer, tag), generation, "send")

    def recv(self, data: torch.Tensor, generation: int, tag: int) -> None:
        self._wait(lambda g: g.recv([data], self.peer, tag), generation, "receive")

    def _wait(self, post: Any, generation: int, what: str) -> None:
        try:
            post(self.group(generation)).wait(timedelta(seconds=self.timeout_s))
        except RuntimeError as err:  # gloo: timeout, connection closed by peer; this group is done
            self._retire()
            raise TransferError(f"KV {what} failed: {str(err)[:300]}") from None

    def group(self, generation: int) -> Any:
        """This generation's gloo group, built (a rendezvous with the other side) when first used."""
        if generation != self.generation:
            self._retire()
            prefix = dist.PrefixStore(f"kv/{generation}", self.store)
            timeout = timedelta(seconds=self.timeout_s)
            try:
                self._group = dist.ProcessGroupGloo(prefix, self.rank, 2, timeout)
            except RuntimeError as err:
                raise TransferError(f"KV group {generation} did not form: {str(err)[:300]}") from None
            self.generation = generation
        return self._group

    def _retire(self) -> None:
        if self._group is not None:
            self._retired.append(self._group)
        self._group, self.generation = None, None

    def close(self) -> None:
        self._retire()
        self._retired.clear()


def open_store(init_method: str, rank: int, world: int, timeout_s: float) -> dist.Store:
    """The rendezvous store of ``world`` instances; rank 0 (the first prefill instance) hosts a TCP one."""
    # worker.join: imported while a group exists, torch._dynamo would keep it alive past close
    import torch._dynamo  # noqa: F401

    url = urlparse(init_method)
    timeout = timedelta(seconds=timeout_s)
    if url.scheme == "file":
        store: dist.Store = dist.FileStore(url.path, world)
        store.set_timeout(timeout)
        return store
    if url.scheme in ("tcp", "env"):
        host = url.hostname if url.scheme == "tcp" else os.environ.get("MASTER_ADDR", "")
        port = url.port if url.scheme == "tcp" else int(os.environ.get("MASTER_PORT", "0"))
        if not host or not port:
            raise InputError("rendezvous", f"needs a host and a port, got {init_method!r}")
        return dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout)
    raise InputError("rendezvous", f"must be file://PATH, tcp://HOST:PORT or env://, got {init_method!r}")
