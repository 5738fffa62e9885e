"""Live expert load balancing on the ranks: plan from their own expert loads, migrate, switch together.

Every rank keeps the last ``window_size`` steps of the expert loads its router produced. Every
``step_interval`` steps the windows are summed onto rank 0, which runs the configured balancer
(meshserve.placement: the same planners the wafer simulator costs) and broadcasts the new placement.
Each new replica is copied from an old holder by point-to-point sends on a separate process group:

- invasive: the copies run on the main thread; the step waits for them (vLLM / SGLang's way);
- non-invasive: the copies run in chunks on a side thread while steps go on with the old placement.

At every step boundary while a migration is in flight the ranks all-reduce two flags (still copying,
failed). When no rank is copying, all switch to the new placement in that same step; when any copy
failed (a send timed out: ``migration_timeout_s``), all drop the migration, keep the old placement,
and the error is reported. No step ever waits for migration bytes in non-invasive mode.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from meshserve.engine.distributed.config import EPLBConfig
from meshserve.engine.distributed.expert_map import spread_placement
from meshserve.engine.distributed.expert_parallel import ExpertParallel, Prepared
from meshserve.engine.distributed.worker import injected_fault
from meshserve.placement import (
    BalanceConfig,
    Migrations,
    Placement,
    make_balancer,
    migrations,
    slots_per_device,
)


def balancedness(placement: Placement, load: np.ndarray) -> float:
    """vLLM's balancedness: mean over ranks / max over ranks of the token load, averaged over layers."""
    per_rank = placement.device_load(load)
    return float((per_rank.mean(axis=-1) / np.maximum(per_rank.max(axis=-1), 1e-12)).mean())


class ExpertCopies:
    """The replica copies of one migration, run in order by every rank (each acting on its own rows)."""

    def __init__(self, target: np.ndarray, moves: Migrations, ep: ExpertParallel, group: dist.ProcessGroup,
                 cfg: EPLBConfig) -> None:
        self.target, self.moves, self.ep, self.group = target, moves, ep, group
        self.prepared: Prepared | None = None
        self.rank = ep.rank
        self.timeout = timedelta(seconds=cfg.migration_timeout_s)
        layer = ep.layers[0]
        self.chunk = max(1, cfg.chunk_bytes // layer.local.experts.down_proj.element_size())
        self.size = layer.expert_size()
        self.dtype = layer.local.experts.down_proj.dtype
        self.arrived: dict[tuple[int, int], torch.Tensor] = {}
        self.error: str | None = None
        self.finished = threading.Event()
        self.abandoned = threading.Event()
        self.thread: threading.Thread | None = None

    def run(self) -> None:
        """Send what this rank holds, receive what it gains, build the new slots aside; then sets
        ``finished`` (or ``error``)."""
        try:
            for layer, expert, src, dst in zip(*(m.tolist() for m in (
                    self.moves.layer, self.moves.expert, self.moves.src, self.moves.dst)), strict=True):
                if self.abandoned.is_set():
                    return
                if self.rank == src:
                    if injected_fault("stall", self.rank):
                        self.abandoned.wait(2 * self.timeout.total_seconds())
                        return
                    for chunk in self.ep.expert_weights(layer, expert).split(self.chunk):
                        dist.isend(chunk, dst, group=self.group).wait(self.timeout)
                elif self.rank == dst:
                    buf = torch.empty(self.size, dtype=self.dtype)
                    for view in buf.split(self.chunk):
                        dist.irecv(view, src, group=self.group).wait(self.timeout)
                    self.arrived[(layer, expert)] = buf
            self.prepared = self.ep.prepare(self.target, self.arrived)
            self.finished.set()
        except Exception as err:  # noqa: BLE001 - a stalled or broken copy becomes a reported error
            self.error = f"rank {self.rank}: {type(err).__name__}: {err}".strip()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="expert-migration", daemon=True)
        self.thread.start()

    def abandon(self) -> None:
        self.abandoned.set()
        if self.thread is not None:
            self.thread.join(1.0)


class LiveBalancer:
    """Per-rank EPLB state: the load window, the planner (used on rank 0) and the migration in flight."""

    def __init__(self, ep: ExpertParallel, cfg: EPLBConfig, rank: int, world_size: int) -> None:
        self.ep, self.cfg, self.rank = ep, cfg, rank
        layers, experts, _ = ep.holds.shape
        self.window = np.zeros((cfg.window_size, layers, experts), dtype=np.int64)
        self.tick = 0
        self.slots = slots_per_device(experts, world_size, cfg.num_redundant_experts)
        self.hops = 1 - np.eye(world_size)  # ranks behind one switch: every peer is one hop away
        policy = BalanceConfig(num_redundant_experts=cfg.num_redundant_experts, window_size=cfg.window_size,
                               step_interval=cfg.step_interval)
        self.planner = make_balancer(cfg.balancer, policy, self.hops, cfg.num_redundant_experts)
        self.base = Placement(spread_placement(layers, experts, world_size, 0), self.slots)
        self.side = self._side_group()
        self.copies: ExpertCopies | None = None
        self.record: dict[str, Any] = {}

    def _side_group(self) -> dist.ProcessGroup:
        return dist.new_group(backend="gloo", timeout=timedelta(seconds=self.cfg.migration_timeout_s))

    def after_step(self, counts: np.ndarray) -> list[dict[str, Any]]:
        """Called by every rank after every step with its expert loads; returns migration records."""
        self.window[self.tick % self.cfg.window_size] = counts
        self.tick += 1
        if self.copies is not None:
            return self._poll()
        if self.tick >= self.cfg.window_size and self.tick % self.cfg.step_interval == 0:
            return self._plan()
        return []

    def _plan(self) -> list[dict[str, Any]]:
        load = torch.from_numpy(self.window.sum(axis=0).astype(np.float64))
        dist.reduce(load, dst=0)
        layers, experts, ranks = self.ep.holds.shape
        new = torch.zeros(layers, experts, ranks, dtype=torch.uint8)
        current = Placement(self.ep.holds, self.slots)
        if self.rank == 0:
            new = torch.from_numpy(self.planner.plan(load.numpy(), current, self.base).holds.astype(np.uint8))
        dist.broadcast(new, src=0)
        target = Placement(new.numpy().astype(bool), self.slots)
        target.validate()
        if (target.holds == current.holds).all():
            return []
        moves = migrations(current, target, self.hops)
        self.record = {
            "tick": self.tick, "mode": self.cfg.mode, "balancer": self.cfg.balancer, "copies": len(moves),
            "bytes": len(moves) * self.ep.expert_bytes(),
            "balancedness_before": balancedness(current, load.numpy()),
            "balancedness_after": balancedness(target, load.numpy()),
            "holds_before": current.holds, "holds_after": target.holds, "load": load.numpy(),
        }
        self._started = time.perf_counter()
        self.copies = ExpertCopies(target.holds, moves, self.ep, self.side, self.cfg)
        if self.cfg.mode == "invasive":
            self.copies.run()
            return self._poll()
        self.copies.start()
        return [{**self.record, "final": False}]

    def _poll(self) -> list[dict[str, Any]]:
        copies = self.copies
        copying = not (copies.finished.is_set() or copies.error)
        flags = torch.tensor([int(copying), int(copies.error is not None)])
        dist.all_reduce(flags)
        still_copying, failed = flags.tolist()
        if failed:
            errors: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(errors, copies.error)
            copies.abandon()
            self.side = self._side_group()  # the old one may hold a half-done send
            message = "; ".join(e for e in errors if e)
            return self._finish(error=f"expert migration stalled ({message}); kept the old placement")
        if still_copying:
            return []
        switch = time.perf_counter()
        self.ep.install(copies.prepared)
        return self._finish(switch_s=time.perf_counter() - switch)

    def _finish(self, **result: Any) -> list[dict[str, Any]]:
        record = {**self.record, **result, "final": True, "switch_tick": self.tick,
                  "migration_s": time.perf_counter() - self._started}
        self.copies, self.record = None, {}
        return [record]

    def close(self) -> None:
        if self.copies is not None:
            self.copies.abandon()
