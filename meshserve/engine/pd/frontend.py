"""PDEngine: N prefill and M decode processes behind the Engine interface (add_request / step / abort /
has_unfinished / close), so LLM, AsyncLLM and the HTTP server run over it as they are
(``LLM(model, pd="prefill=2,decode=1")``, ``meshserve serve --pd prefill=1,decode=1``).

The router (router.py): a prompt goes to the instance that takes prompts (the prefill ones, and decode ones
switched to mixed) with the fewest queued prompt tokens, and its KV to the decode instance with the most
free KV blocks; both counts are the instances' latest reports plus what was routed to them since. Outputs come
from whichever instance ends a request (prefill: at the first token or a failed transfer; decode:
everything else). The instances share the cores (each its own torch threads) and meet over KV links
whose rendezvous is a temporary file. An instance that dies ends every unfinished request with an error
naming it (the others keep running, so their blocks can be checked); the finalizer terminates every
process (no orphans).
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
from meshserve.engine.groups import child_ids
from meshserve.engine.outputs import RequestOutput
from meshserve.engine.pd.config import ROLES, instance_names, parse_pd
from meshserve.engine.pd.instance import InstanceSpec, run_instance
from meshserve.engine.pd.merge import Pending
from meshserve.engine.pd.router import Router
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
        """Start the instances here, or (``endpoints``: remote.py) talk to a pair started on its own."""
        self.config = config
        counts, self.policy = parse_pd(config.pd) if config.pd is not None else ({r: 1 for r in ROLES}, None)
        names = instance_names(counts)
        self.kinds = {name: role for role in ROLES for name in names[role]}  # each instance's own role
        self.decoders = names["decode"]  # by index: the target a prefill instance sends a request's KV to
        self.roles = dict(self.kinds)  # each instance's role now (set_role, the policy)
        self.model_config, self.tokenizer = load_config(config.model, config.dtype, config.revision)
        config = dataclasses.replace(config, pd=None)
        require(
            transfer_timeout_s > 0, "transfer_timeout_s", f"must be > 0 seconds, got {transfer_timeout_s}"
        )
        if endpoints is None:
            endpoints = self._spawn(config, transfer_timeout_s, counts)
        else:
            self._finalizer = weakref.finalize(self, _close_all, [e.conn for e in endpoints.values()])
        self.endpoints = endpoints
        self.conns = {name: e.conn for name, e in endpoints.items()}
        self.router = Router(self.kinds, config.cache.block_size)
        self.unfinished: dict[str, Pending] = {}  # by the caller's id
        self.parents: dict[str, str] = {}  # an n > 1 request's completion ids (the decode side's) -> its id
        self.dead: str | None = None
        self._early: list[tuple] = []  # messages met while waiting for another kind
        self._ids = itertools.count()  # request ids, stats tokens
        for name in self.kinds:
            reply = self._reply(name, START_TIMEOUT_S)
            if reply[0] != "ready":
                self.kill()
                kind, *value = reply[1]
                if kind == "input":
                    raise InputError(*value)
                raise PDError(f"the {name} instance failed to start: {value[-1]}")
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
        self.stats()  # every instance's free blocks and queue, for the first routes

    def _spawn(
        self, config: EngineConfig, transfer_timeout_s: float, counts: dict[str, int]
    ) -> dict[str, Spawned]:
        store = tempfile.NamedTemporaryFile(prefix="meshserve-pd-", delete=False)  # noqa: SIM115
        store.close()
        os.unlink(store.name)  # the file store creates it
        total = len(self.kinds)  # the cores this engine may use, split between the processes
        cores = [max(1, config.num_threads // total + (k < config.num_threads % total)) for k in range(total)]
        ctx = mp.get_context("spawn")
        procs: list[Any] = []
        self._finalizer = weakref.finalize(self, _kill, procs, store.name)
        endpoints = {}
        numbers = {"prefill": 0, "decode": 0}
        for (name, role), threads in zip(self.kinds.items(), cores, strict=True):
            index, numbers[role] = numbers[role], numbers[role] + 1
            spec = InstanceSpec(
                role,
                config,
                f"file://{store.name}",
                transfer_timeout_s,
                threads,
                index,
                (counts["prefill"], counts["decode"]),
                name,
            )
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=run_instance, args=(spec, theirs), daemon=True, name=f"meshserve-{name}"
            )
            proc.start()
            theirs.close()
            procs.append(proc)
            endpoints[name] = Spawned(proc, ours)
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
        if request_id is None:
            request_id = next(i for i in map(str, self._ids) if i not in self.unfinished)
        request_id = str(request_id)
        require(request_id not in self.unfinished, "request_id", f"{request_id!r} is already in use")
        name, target = self.router.route(self.roles, self._num_tokens(prompt))
        self.conns[name].send(("add", (prompt, params, request_id, stream, detokenize, arrival, target)))
        self.unfinished[request_id] = Pending(request_id, params.n, stream)
        if params.n > 1:
            self.parents |= dict.fromkeys(child_ids(request_id, params.n), request_id)
        return request_id

    def _num_tokens(self, prompt: str | list[int]) -> int:
        """The prompt's length in tokens for the router (a bad prompt's error comes from the instance)."""
        if not isinstance(prompt, str):
            return len(prompt) if isinstance(prompt, (list, tuple)) else 0
        try:
            return len(self.tokenizer.encode(prompt))
        except InputError:
            return 0

    def abort(self, request_id: str, index: int | None = None) -> bool:
        """As Engine.abort: the request (completion ``index``, or all) ends on every instance, wherever it
        is (instance.py); it reports nothing more once no completion runs."""
        request_id = str(request_id)
        pending = self.unfinished.get(request_id)
        if pending is None or (index is not None and index in pending.done):
            return False
        pending.end(index, "abort")
        if pending.finished:
            self._forget(request_id)
        children = child_ids(request_id, pending.n)
        children = children if index is None else children[index : index + 1]
        for name in self.kinds:
            if self.endpoints[name].alive():
                with contextlib.suppress(OSError):
                    self.conns[name].send(("abort", (request_id, index, children)))
        return True

    def _forget(self, request_id: str) -> None:
        pending = self.unfinished.pop(request_id)
        if pending.n > 1:
            for child in child_ids(request_id, pending.n):
                del self.parents[child]

    def set_role(self, instance: str, role: str) -> None:
        """Switch an instance's role live (weights and KV stay; Engine.set_role): a prefill instance between
        prefill and mixed (it decodes its own requests), a decode one between decode and mixed (prompts
        go to it too). Each switches only between its own role and mixed, so at least one instance always
        prefills and one decodes."""
        require(instance in self.kinds, "instance", f"unknown {instance!r}; allowed: {', '.join(self.kinds)}")
        allowed = (self.kinds[instance], "mixed")
        require(
            role in allowed,
            "role",
            f"the {instance} instance switches between {' and '.join(allowed)}, got {role!r}",
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
        """Requests waiting on the prefill instances (their latest reports)."""
        stats = self.role_stats
        return sum(stats.get(n, {}).get("waiting", 0) for n, kind in self.kinds.items() if kind == "prefill")

    def step(self) -> list[RequestOutput]:
        """The outputs that arrive within a short wait (the instances step on their own)."""
        outs = self.poll(STEP_WAIT_S)
        self.num_steps += 1
        if self.policy is not None and self.dead is None:
            for instance, role in self.policy.decide(self.roles, self.role_stats, self.kinds).items():
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
        live = [self.conns[n] for n in self.kinds if self.endpoints[n].alive() or self.conns[n].poll()]
        if wait(live, timeout=0 if messages else timeout_s):
            # A request's messages from the prefill side precede its decode side's (it reaches the decode
            # side after them): drain the decode pipes first, then the prefill ones, and take prefill's first.
            later = [m for n in self.decoders for m in _drain(self.endpoints[n])]
            prefill = [n for n, kind in self.kinds.items() if kind == "prefill"]
            messages += [m for n in prefill for m in _drain(self.endpoints[n])] + later
        outs: list[RequestOutput] = []
        for kind, *value in messages:
            if kind == "out":
                request_id = self.parents.get(value[0].request_id, value[0].request_id)
                pending = self.unfinished.get(request_id)
                out = None if pending is None else pending.take(value[0])
                if out is not None:
                    outs.append(out)
                if pending is not None and pending.finished:
                    self._forget(request_id)
            elif kind == "stats":
                self._report(value[0])
            elif kind == "rejected" and value[0] in self.unfinished:
                outs.append(self.unfinished[value[0]].end(None, "error", f"{value[1][1]}: {value[1][2]}"))
                self._forget(value[0])
        for name in self.kinds:
            if not self.endpoints[name].alive() and self.dead is None:
                self.dead = f"the {name} instance {self.endpoints[name].gone()}"
        if self.dead is not None:
            outs += [pending.end(None, "error", self.dead) for pending in self.unfinished.values()]
            self.unfinished.clear()
            self.parents.clear()
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
        for name in self.kinds:
            if self.endpoints[name].alive():
                token = next(self._ids)
                self.conns[name].send(("stats", (token,)))
                out[name] = self._report(self._reply(name, timeout_s, ("stats", token))[1])
        return out

    def _report(self, stats: dict[str, Any]) -> dict[str, Any]:
        """An instance's latest report: what was routed to it before is in its counts now."""
        name = stats["role"]
        self.role_stats[name] = stats
        self.router.report(name, stats)
        return stats

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
        for name in self.kinds:
            if self.endpoints[name].alive():
                with contextlib.suppress(OSError):  # it just died
                    self.conns[name].send(("close", ()))
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
