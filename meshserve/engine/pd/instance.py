"""One role's process: an Engine plus its side of the KV link, serving a front end's commands through a pipe.

The loop: commands from the pipe (add, abort, stats, close), offers waiting on the links (decode), one engine
step when there is work, and the handed-off requests' transfers (prefill). Outputs go back through the pipe as
("out", RequestOutput); a prefill instance sends only those that end there (at the first token, or failed).

A prefill instance has a link to every decode instance and sends each request to the one the front end
chose for it (``add``'s target); a decode instance takes offers from every prefill instance.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from meshserve.config import EngineConfig
from meshserve.engine.distributed.worker import portable
from meshserve.engine.engine import Engine
from meshserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from meshserve.engine.pd.link import DECODE, PREFILL, KVLink, TransferError, open_store
from meshserve.engine.pd.receiver import Cancelled, Receiver
from meshserve.engine.pd.sender import Sender
from meshserve.engine.pd.stats import TransferStats
from meshserve.engine.request import Request
from meshserve.errors import InputError

logger = logging.getLogger(__name__)
IDLE_S = 0.002  # how long an idle instance waits on its pipe before it looks for offers again
REPORT_S = 0.25  # how often an instance sends its stats unasked


@dataclass
class InstanceSpec:
    role: str  # "prefill" or "decode"
    config: EngineConfig
    init_method: str  # the KV link's rendezvous (link.py)
    timeout_s: float  # one transfer's waits
    threads: int  # this process's share of the cores
    index: int = 0  # which instance of its role
    counts: tuple[int, int] = (1, 1)  # prefill and decode instances in all
    name: str = ""  # what the front end calls it (default: the role)


class Instance:
    def __init__(self, spec: InstanceSpec) -> None:
        self.role = spec.role
        self.name = spec.name or spec.role
        self.engine = Engine(dataclasses.replace(spec.config, role=spec.role, num_threads=spec.threads))
        num_prefill, num_decode = spec.counts
        rank = spec.index if spec.role == "prefill" else num_prefill + spec.index
        store = open_store(spec.init_method, rank, num_prefill + num_decode, spec.timeout_s)
        self.transfers = TransferStats()  # every link's transfers together
        self.links: list[KVLink] = []
        if spec.role == "prefill":  # one Sender per decode instance, by its index
            self.links = [
                KVLink.pair(store, spec.index, d, PREFILL, spec.timeout_s) for d in range(num_decode)
            ]
            self.senders = [Sender(self.engine, link, self.transfers) for link in self.links]
            self.receivers: list[Receiver] = []
        else:
            self.links = [
                KVLink.pair(store, p, spec.index, DECODE, spec.timeout_s) for p in range(num_prefill)
            ]
            self.cancelled = Cancelled()  # aborted before their offers came: every link's
            self.receivers = [
                Receiver(self.engine, link, self.transfers, self.cancelled) for link in self.links
            ]
            self.senders = []
        self._next_report = 0.0
        self._busy = False
        self.handed: dict[str, RequestOutput] = {}  # prefill: the output each handed-off request ended with
        self.targets: dict[str, int] = {}  # prefill: the decode instance each request goes to

    def serve(self, conn: Connection) -> bool:
        """Answer commands and run the engine until "close" (True) or the front end is gone (False)."""
        try:
            while True:
                while conn.poll():
                    command, args = conn.recv()
                    if command == "close":
                        return True
                    self.handle(conn, command, args)
                if self.work(conn):
                    self._busy = True
                    if time.monotonic() > self._next_report:  # while busy: queue and KV use for routing
                        conn.send(("stats", self.stats(), None))
                        self._next_report = time.monotonic() + REPORT_S
                else:
                    if self._busy:  # once idle again: so the front end does not route on a stale queue
                        conn.send(("stats", self.stats(), None))
                        self._busy = False
                    conn.poll(IDLE_S)
        except (EOFError, OSError):  # the front end hung up
            return False

    def handle(self, conn: Connection, command: str, args: tuple) -> None:
        if command == "add":
            prompt, params, request_id, stream, detokenize, arrival, target = args
            try:
                self.engine.add_request(prompt, params, request_id, stream, detokenize, arrival)
            except InputError as err:
                conn.send(("rejected", request_id, portable(err)))
                return
            if self.senders:
                self.targets[request_id] = target
        elif command == "abort":
            self.abort(*args)
        elif command == "role":
            self.engine.set_role(*args)
        elif command == "stats":
            conn.send(("stats", self.stats(), *args))
        else:
            raise ValueError(f"unknown command {command!r}")

    def abort(self, request_id: str, index: int | None, children: list[str]) -> None:
        """End a request (completion ``index``, or all) here, wherever it is: running (Engine.abort),
        handed off and waiting for its transfer (its blocks freed, never offered), or not here yet (a
        decode instance, which runs each completion as a request of its own, ``children``, remembers
        those it does not know, and cancels their offers when they come)."""
        known = self.engine.abort(request_id, index)
        for request in list(self.engine.handoffs):
            if request.parent_id == request_id and index in (None, request.index):
                self.engine.release(request)
                self.handed.pop(request.request_id, None)
                self._settle(request_id)
                known = True
        if self.receivers and not known:
            for child in children:
                if not self.engine.abort(child):
                    self.cancelled.add(child)

    def work(self, conn: Connection) -> bool:
        """One round: offers, a step, transfers; False when there was nothing to do."""
        if sum(receiver.poll() for receiver in self.receivers) > 0:
            return True  # commands that came during the transfers (an abort) are read before the next step
        worked = False
        if self.engine.has_unfinished():
            worked = True
            outs = self.engine.step()
            handed = {(r.parent_id, r.index): r for r in self.engine.handoffs}
            for out in outs:
                self.report(conn, out, handed)
        full: set[int] = set()  # decode instances with no room now: their requests wait, in order
        for request in list(self.engine.handoffs):
            target = self.targets.get(request.parent_id, 0)
            if target in full:
                continue
            worked = True
            try:
                if not self.senders[target].transfer(request):
                    full.add(target)  # try again after the next step
                    continue
                self.handed.pop(request.request_id, None)
            except TransferError as err:
                out = self.handed.pop(request.request_id, None)
                if out is None:  # an n > 1 request's output comes once all its completions are handed off
                    completion = CompletionOutput(request.index, "", [], "handoff")
                    out = RequestOutput(
                        request.parent_id,
                        None,
                        [],
                        [completion],
                        True,
                        RequestMetrics(time.time(), None, None),
                    )
                conn.send(("out", ended(out, str(err), finished=True, empty=request.stream)))
            self._settle(request.parent_id)
        return worked

    def report(self, conn: Connection, out: RequestOutput, handed: dict[tuple[str, int], Request]) -> None:
        """Send the front end what it gets of a step's output: completions that ended here, and a streamed
        request's new tokens; a completion handed off (``handed``, by (request id, index)) ends on the
        decode side, so here it is kept for a failed transfer's error."""
        moving = [c for c in out.outputs if c.finish_reason == "handoff"]
        stream = False
        for completion in moving:
            request = handed.get((out.request_id, completion.index))
            if request is not None:  # (else its transfer has failed already, and said so)
                self.handed[request.request_id] = dataclasses.replace(out, outputs=[completion])
                stream = request.stream
        going = [c for c in out.outputs if c.finish_reason != "handoff"]
        if stream:  # the handed-off completions' new tokens go out now; the decode side sends the rest
            going = [
                c if c.finish_reason != "handoff" else dataclasses.replace(c, finish_reason=None)
                for c in out.outputs
            ]
        if going:
            conn.send(("out", dataclasses.replace(out, outputs=going, finished=not moving and out.finished)))
        self._settle(out.request_id)

    def _settle(self, request_id: str) -> None:
        """Forget a request's decode target once nothing of it is left here."""
        engine = self.engine
        if request_id not in engine.groups and all(r.parent_id != request_id for r in engine.handoffs):
            self.targets.pop(request_id, None)

    def stats(self) -> dict[str, Any]:
        """What /metrics shows per role: queue, KV use, transfers."""
        engine = self.engine
        queued = engine.scheduler.waiting + engine.scheduler.running
        return {
            "role": self.name,  # which instance: its role now is the engine's
            "engine_role": engine.role,
            "waiting": len(engine.scheduler.waiting),
            "running": len(engine.scheduler.running),
            "queued_tokens": sum(r.num_tokens - r.num_computed_tokens for r in queued),  # for routing
            "handoffs": len(engine.handoffs),
            "num_blocks": engine.blocks.num_blocks,
            "num_free_blocks": engine.blocks.num_free_blocks,
            "kv_usage": engine.blocks.usage,
            "transfer": self.transfers.summary(),
            "steps": engine.num_steps,
        }

    def close(self) -> None:
        self.engine.close()
        for link in self.links:
            link.close()


def ended(out: RequestOutput, error: str | None, finished: bool, empty: bool = False) -> RequestOutput:
    """A handed-off request's output as the front end sees it: going on (its tokens streamed now), or ended
    with ``error`` (``empty``: its tokens were streamed already)."""
    reason = "error" if error is not None else None
    completion = dataclasses.replace(out.outputs[0], finish_reason=reason, error=error)
    if empty:
        completion = dataclasses.replace(completion, text="", token_ids=[], logprobs=None)
    return dataclasses.replace(out, outputs=[completion], finished=finished)


def run_instance(spec: InstanceSpec, conn: Connection) -> None:
    """Process entry point: start, say ("ready", max_model_len) or ("error", ...), then serve."""
    try:
        instance = Instance(spec)
    except BaseException as err:  # noqa: BLE001 - reported to the front end, which stops both
        conn.send(("error", portable(err)))
        return
    conn.send(("ready", instance.engine.max_model_len))
    try:
        instance.serve(conn)
    finally:
        instance.close()
