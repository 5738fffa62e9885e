"""PDEngine: one prefill and one decode process behind one interface (add_request / poll / abort / generate).

Requests go to the prefill instance; their outputs come from whichever instance ends them (prefill: at the
first token or a failed transfer; decode: everything else). The instances share the cores (each its own
torch threads) and meet over a KV link whose rendezvous is a temporary file. An instance that dies ends
every unfinished request with an error naming it (the other instance keeps running, so its blocks can be
checked); its finalizer terminates both processes (no orphans).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any

import torch.multiprocessing as mp

from meshserve.config import EngineConfig, available_cores
from meshserve.engine.distributed.processes import _kill  # terminate, then kill; removes the rendezvous file
from meshserve.engine.distributed.ranks import RankError
from meshserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from meshserve.engine.pd.instance import InstanceSpec, run_instance
from meshserve.engine.sampling_params import SamplingParams
from meshserve.errors import InputError, require

ROLES = ("prefill", "decode")
START_TIMEOUT_S = 300.0


class PDError(RankError):
    """An instance failed to start or died."""


class PDEngine:
    def __init__(self, config: EngineConfig, transfer_timeout_s: float = 30.0) -> None:
        require(
            transfer_timeout_s > 0, "transfer_timeout_s", f"must be > 0 seconds, got {transfer_timeout_s}"
        )
        store = tempfile.NamedTemporaryFile(prefix="meshserve-pd-", delete=False)  # noqa: SIM115
        store.close()
        os.unlink(store.name)  # the file store creates it
        cores = available_cores()
        threads = {"prefill": max(1, cores // 2), "decode": max(1, cores - cores // 2)}
        ctx = mp.get_context("spawn")
        self.procs: dict[str, Any] = {}
        self.conns: dict[str, Connection] = {}
        procs: list[Any] = []
        self._finalizer = weakref.finalize(self, _kill, procs, store.name)
        for role in ROLES:
            spec = InstanceSpec(role, config, f"file://{store.name}", transfer_timeout_s, threads[role])
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=run_instance, args=(spec, theirs), daemon=True, name=f"meshserve-{role}"
            )
            proc.start()
            theirs.close()
            procs.append(proc)
            self.procs[role], self.conns[role] = proc, ours
        self.unfinished: dict[str, tuple[list[int] | str, SamplingParams]] = {}
        self.dead: str | None = None
        self._early: list[tuple] = []  # messages met while waiting for another kind
        self._ids = itertools.count()
        for role in ROLES:
            reply = self._reply(role, START_TIMEOUT_S)
            if reply[0] != "ready":
                self.kill()
                kind, *value = reply[1]
                if kind == "input":
                    raise InputError(*value)
                raise PDError(f"the {role} instance failed to start: {value[-1]}")
            self.max_model_len = reply[1]

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        stream: bool = False,
    ) -> str:
        if self.dead is not None:
            raise PDError(self.dead)
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        require(request_id not in self.unfinished, "request_id", f"{request_id!r} is already in use")
        self.conns["prefill"].send(("add", (prompt, params, request_id, stream)))
        self.unfinished[request_id] = (prompt, params)
        return request_id

    def abort(self, request_id: str) -> None:
        for role in ROLES:
            if self.procs[role].is_alive():
                self.conns[role].send(("abort", (request_id,)))
        self.unfinished.pop(request_id, None)

    def poll(self, timeout_s: float) -> list[RequestOutput]:
        """Outputs that arrive within ``timeout_s`` (finished, or deltas of streamed requests)."""
        messages, self._early = self._early, []
        live = {self.conns[r]: r for r in ROLES if self.procs[r].is_alive() or self.conns[r].poll()}
        for conn in wait(list(live), timeout=0 if messages else timeout_s):
            while conn.poll():
                try:
                    messages.append(conn.recv())
                except (EOFError, OSError):
                    break
        outs: list[RequestOutput] = []
        for kind, *value in messages:
            if kind == "out" and value[0].request_id in self.unfinished:
                outs.append(value[0])
                if value[0].finished:
                    del self.unfinished[value[0].request_id]
            elif kind == "rejected" and value[0] in self.unfinished:
                del self.unfinished[value[0]]
                completion = CompletionOutput(0, "", [], "error", error=f"{value[1][1]}: {value[1][2]}")
                outs.append(_output(value[0], completion))
        for role in ROLES:
            if not self.procs[role].is_alive() and self.dead is None:
                self.procs[role].join(1.0)
                self.dead = f"the {role} instance exited (code {self.procs[role].exitcode})"
        if self.dead is not None:
            outs += [
                _output(i, CompletionOutput(0, "", [], "error", error=self.dead)) for i in self.unfinished
            ]
            self.unfinished.clear()
        return outs

    def generate(
        self, prompts: list[list[int] | str], params: SamplingParams, timeout_s: float = 600.0
    ) -> list[RequestOutput]:
        """Every prompt's final output, in order; PDError when they do not all end within ``timeout_s``."""
        ids = [self.add_request(p, params) for p in prompts]
        done: dict[str, RequestOutput] = {}
        deadline = time.monotonic() + timeout_s
        while len(done) < len(ids):
            if time.monotonic() > deadline:
                raise PDError(f"{len(ids) - len(done)} requests did not finish within {timeout_s:g} s")
            for out in self.poll(0.1):
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def stats(self, timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
        """Each live instance's queue, KV use and transfer counters."""
        out = {}
        for role in ROLES:
            if self.procs[role].is_alive():
                self.conns[role].send(("stats", ()))
                out[role] = self._reply(role, timeout_s, "stats")[1]
        return out

    def _reply(self, role: str, timeout_s: float, kind: str | None = None) -> tuple:
        """The next message of ``kind`` from ``role`` (outputs met on the way are kept for poll)."""
        conn, deadline = self.conns[role], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if conn.poll(0.1):
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break
                if kind is None or message[0] == kind:
                    return message
                self._early.append(message)
            elif not self.procs[role].is_alive():
                break
        self.kill()
        raise PDError(f"the {role} instance did not answer within {timeout_s:g} s or exited")

    def close(self) -> None:
        for role in ROLES:
            if self.procs[role].is_alive():
                with contextlib.suppress(OSError):  # it just died
                    self.conns[role].send(("close", ()))
        deadline = time.monotonic() + 10.0
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        self._finalizer()

    def __enter__(self) -> PDEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _output(request_id: str, completion: CompletionOutput) -> RequestOutput:
    """The final output of a request that ended here (its instance died, or refused it)."""
    return RequestOutput(
        request_id, None, [], [completion], True, RequestMetrics(time.time(), None, time.time())
    )
