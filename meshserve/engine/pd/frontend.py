"""PDEngine: one prefill and one decode process behind the Engine interface (add_request / step / abort /
has_unfinished / close), so LLM, AsyncLLM and the HTTP server run over it as they are
(``LLM(model, pd="prefill=1,decode=1")``, ``meshserve serve --pd prefill=1,decode=1``).

Requests go to the prefill instance; their outputs come from whichever instance ends them (prefill: at the
first token or a failed transfer; decode: everything else). The instances share the cores (each its own
torch threads) and meet over a KV link whose rendezvous is a temporary file. An instance that dies ends
every unfinished request with an error naming it (the other instance keeps running, so its blocks can be
checked); its finalizer terminates both processes (no orphans).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import tempfile
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any

import torch.multiprocessing as mp

from meshserve.config import EngineConfig
from meshserve.engine.distributed.frontend import RankBlocks
from meshserve.engine.distributed.processes import _kill  # terminate, then kill; removes the rendezvous file
from meshserve.engine.distributed.ranks import RankError
from meshserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from meshserve.engine.pd.config import ROLES, parse_pd
from meshserve.engine.pd.instance import InstanceSpec, run_instance
from meshserve.engine.sampling_params import SamplingParams
from meshserve.errors import InputError, require
from meshserve.models.loader import load_config

START_TIMEOUT_S = 300.0
STEP_WAIT_S = 0.02  # step(): how long to wait for outputs before returning none


class PDError(RankError):
    """An instance failed to start or died."""


class Spawned:
    """An instance this front end started: a process and its pipe."""

    def __init__(self, proc: Any, conn: Connection) -> None:
        self.proc, self.conn = proc, conn

    def alive(self) -> bool:
        return self.proc.is_alive()

    def gone(self) -> str:
        self.proc.join(1.0)
        return f"exited (code {self.proc.exitcode})"


class Remote:
    """An instance started on its own (``meshserve serve --role``), reached over a socket (remote.py)."""

    def __init__(self, conn: Connection, address: str) -> None:
        self.conn, self.address, self.closed = conn, address, False

    def alive(self) -> bool:
        return not self.closed

    def gone(self) -> str:
        return f"at {self.address} closed its connection"


class PDEngine:
    def __init__(
        self, config: EngineConfig, transfer_timeout_s: float = 30.0, endpoints: dict[str, Any] | None = None
    ) -> None:
        """Start both instances here, or (``endpoints``: remote.py) talk to instances started on their own."""
        self.config = config
        _, self.policy = parse_pd(config.pd) if config.pd is not None else (None, None)
        self.roles = {role: role for role in ROLES}  # each instance's role now (set_role, the policy)
        self.model_config, self.tokenizer = load_config(config.model, config.dtype, config.revision)
        config = dataclasses.replace(config, pd=None)
        require(
            transfer_timeout_s > 0, "transfer_timeout_s", f"must be > 0 seconds, got {transfer_timeout_s}"
        )
        if endpoints is None:
            endpoints = self._spawn(config, transfer_timeout_s)
        else:
            self._finalizer = weakref.finalize(self, _close_all, [e.conn for e in endpoints.values()])
        self.endpoints = endpoints
        self.conns = {role: e.conn for role, e in endpoints.items()}
        self.unfinished: dict[str, tuple[list[int] | str, SamplingParams]] = {}
        self.dead: str | None = None
        self._early: list[tuple] = []  # messages met while waiting for another kind
        self._ids = itertools.count()  # request ids, stats tokens
        for role in ROLES:
            reply = self._reply(role, START_TIMEOUT_S)
            if reply[0] != "ready":
                self.kill()
                kind, *value = reply[1]
                if kind == "input":
                    raise InputError(*value)
                raise PDError(f"the {role} instance failed to start: {value[-1]}")
            self.max_model_len = reply[1]
        self.tokenizer.bound_prompt_chars(self.max_model_len)
        # What the HTTP server reads of an Engine: stats from the instances' latest reports (instance.py).
        self.role_stats: dict[str, dict[str, Any]] = {}
        self.num_steps = 0
        self.num_preemptions = 0
        self.last_stats: dict[str, Any] = {}
        self.blocks = RankBlocks()
        self.spec = None
        self.switches: list[tuple[float, str, str]] = []  # (monotonic time, instance, role) of each switch

    def _spawn(self, config: EngineConfig, transfer_timeout_s: float) -> dict[str, Spawned]:
        store = tempfile.NamedTemporaryFile(prefix="meshserve-pd-", delete=False)  # noqa: SIM115
        store.close()
        os.unlink(store.name)  # the file store creates it
        cores = config.num_threads  # the cores this engine may use, split between the two processes
        threads = {"prefill": max(1, cores // 2), "decode": max(1, cores - cores // 2)}
        ctx = mp.get_context("spawn")
        procs: list[Any] = []
        self._finalizer = weakref.finalize(self, _kill, procs, store.name)
        endpoints = {}
        for role in ROLES:
            spec = InstanceSpec(role, config, f"file://{store.name}", transfer_timeout_s, threads[role])
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=run_instance, args=(spec, theirs), daemon=True, name=f"meshserve-{role}"
            )
            proc.start()
            theirs.close()
            procs.append(proc)
            endpoints[role] = Spawned(proc, ours)
        return endpoints

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: bool = False,
        detokenize: bool = True,
        arrival: float | None = None,
    ) -> str:
        """Queue a prompt on the prefill instance (as Engine.add_request). Its bad input comes back as an
        output ending in "error" naming the field (the instance checks it)."""
        if self.dead is not None:
            raise PDError(self.dead)
        params = SamplingParams() if params is None else params
        require(
            isinstance(params, SamplingParams), "sampling_params", "must be a SamplingParams (no pooling)"
        )
        require(
            params.n == 1,
            "n",
            f"a prefill/decode pair serves single completions: n must be 1, got {params.n}",
        )
        if request_id is None:
            request_id = next(i for i in map(str, self._ids) if i not in self.unfinished)
        request_id = str(request_id)
        require(request_id not in self.unfinished, "request_id", f"{request_id!r} is already in use")
        self.conns[self._route()].send(("add", (prompt, params, request_id, stream, detokenize, arrival)))
        self.unfinished[request_id] = (prompt, params)
        return request_id

    def abort(self, request_id: str, index: int | None = None) -> bool:
        """As Engine.abort; a pair runs n = 1 only, so ending completion ``index`` ends the request."""
        if self.unfinished.pop(str(request_id), None) is None:
            return False
        for role in ROLES:
            if self.endpoints[role].alive():
                with contextlib.suppress(OSError):
                    self.conns[role].send(("abort", (str(request_id),)))
        return True

    def _route(self) -> str:
        """The instance a new prompt goes to: the prefill one, or the decode one while it is mixed and its
        queue is the shorter."""
        if self.roles["decode"] != "mixed":
            return "prefill"
        waiting = {r: self.role_stats.get(r, {}).get("waiting", 0) for r in ROLES}
        return min(ROLES, key=lambda r: (waiting[r], r != "prefill"))

    def set_role(self, instance: str, role: str) -> None:
        """Switch an instance's role live (weights and KV stay; Engine.set_role): the prefill instance between
        prefill and mixed (it decodes its own requests), the decode one between decode and mixed (prompts
        go to it too)."""
        allowed = {"prefill": ("prefill", "mixed"), "decode": ("decode", "mixed")}
        require(instance in allowed, "instance", f"unknown {instance!r}; allowed: {', '.join(allowed)}")
        require(
            role in allowed[instance],
            "role",
            f"the {instance} instance switches between {' and '.join(allowed[instance])}, got {role!r}",
        )
        if self.dead is not None:
            raise PDError(self.dead)
        self.conns[instance].send(("role", (role,)))
        self.roles[instance] = role
        self.switches.append((time.monotonic(), instance, role))

    def has_unfinished(self) -> bool:
        return bool(self.unfinished)

    @property
    def num_waiting(self) -> int:
        """Requests waiting on the prefill instance (its latest report)."""
        return self.role_stats.get("prefill", {}).get("waiting", 0)

    def step(self) -> list[RequestOutput]:
        """The outputs that arrive within a short wait (the instances step on their own)."""
        outs = self.poll(STEP_WAIT_S)
        self.num_steps += 1
        if self.policy is not None and self.dead is None:
            for instance, role in self.policy.decide(self.roles, self.role_stats).items():
                self.set_role(instance, role)
        stats = self.role_stats.values()
        self.last_stats = {
            "running": sum(s["running"] for s in stats),
            "waiting": sum(s["waiting"] for s in stats),
            "kv_usage": max((s["kv_usage"] for s in stats), default=0.0),
        }
        return outs

    def poll(self, timeout_s: float) -> list[RequestOutput]:
        """Outputs that arrive within ``timeout_s`` (finished, or deltas of streamed requests)."""
        messages, self._early = self._early, []
        live = [self.conns[r] for r in ROLES if self.endpoints[r].alive() or self.conns[r].poll()]
        if wait(live, timeout=0 if messages else timeout_s):
            # A request's messages from the prefill side precede its decode side's (it reaches the decode
            # side after them): drain the decode pipe first, then the prefill one, and take prefill's first.
            later = _drain(self.endpoints["decode"])
            messages += _drain(self.endpoints["prefill"]) + later
        outs: list[RequestOutput] = []
        for kind, *value in messages:
            if kind == "out" and value[0].request_id in self.unfinished:
                outs.append(value[0])
                if value[0].finished:
                    del self.unfinished[value[0].request_id]
            elif kind == "stats":
                self.role_stats[value[0]["role"]] = value[0]
            elif kind == "rejected" and value[0] in self.unfinished:
                del self.unfinished[value[0]]
                completion = CompletionOutput(0, "", [], "error", error=f"{value[1][1]}: {value[1][2]}")
                outs.append(_output(value[0], completion))
        for role in ROLES:
            if not self.endpoints[role].alive() and self.dead is None:
                self.dead = f"the {role} instance {self.endpoints[role].gone()}"
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
            if self.endpoints[role].alive():
                token = next(self._ids)
                self.conns[role].send(("stats", (token,)))
                out[role] = self.role_stats[role] = self._reply(role, timeout_s, ("stats", token))[1]
        return out

    def _reply(self, role: str, timeout_s: float, kind: tuple | None = None) -> tuple:
        """The next message from ``role`` (with ``kind``: the one whose first and last items are those; others
        met on the way are kept for poll)."""
        conn, deadline = self.conns[role], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if conn.poll(0.1):
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    if isinstance(self.endpoints[role], Remote):
                        self.endpoints[role].closed = True
                    break
                if kind is None or (message[0], message[-1]) == kind:
                    return message
                self._early.append(message)
            elif not self.endpoints[role].alive():
                break
        self.kill()
        raise PDError(f"the {role} instance did not answer within {timeout_s:g} s or exited")

    def close(self) -> None:
        for role in ROLES:
            if self.endpoints[role].alive():
                with contextlib.suppress(OSError):  # it just died
                    self.conns[role].send(("close", ()))
        deadline = time.monotonic() + 10.0
        for endpoint in self.endpoints.values():
            if isinstance(endpoint, Spawned):
                endpoint.proc.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    @property
    def procs(self) -> dict[str, Any]:
        """The instances' processes, when this front end started them."""
        return {r: e.proc for r, e in self.endpoints.items() if isinstance(e, Spawned)}

    def kill(self) -> None:
        self._finalizer()

    def __enter__(self) -> PDEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain(endpoint: Spawned | Remote) -> list[tuple]:
    messages = []
    while True:
        try:
            if not endpoint.conn.poll():
                return messages
            messages.append(endpoint.conn.recv())
        except (EOFError, OSError):  # its process is gone
            if isinstance(endpoint, Remote):
                endpoint.closed = True
            return messages


def _close_all(conns: list[Connection]) -> None:
    for conn in conns:
        conn.close()


def _output(request_id: str, completion: CompletionOutput) -> RequestOutput:
    """The final output of a request that ended here (its instance died, or refused it)."""
    return RequestOutput(
        request_id, None, [], [completion], True, RequestMetrics(time.time(), None, time.time())
    )
