"""Live expert load balancing on the ranks: plan from their own expert loads, migrate, switch together.

Every rank keeps the last ``window_size`` steps of the expert loads its router produced. Every
``step_interval`` steps the windows are summed onto rank 0, which runs the configured balancer
(meshserve.placement: the same planners the wafer simulator costs) and broadcasts the new placement.
Under ``ep_dispatch="balanced"`` a plan is applied and scored as the simulator does for that rule
(:func:`live_policy`): its replica groups joined, its balancedness on the levelled loads.
The copies that build it (migration.py) run:

- invasive: all at once inside the step that planned them; that step waits (vLLM / SGLang's way);
- non-invasive: a byte budget at a time between steps, in the time a rank waits for its next step
  command; the old placement serves until the last chunk has landed.

The budget adapts to the idle time it finds (no guessed rate): every rank proposes 1.5x the last
budget when its copies finished before the next step command arrived, half when they ran into it,
but never less than the busiest rank's bytes / ``step_interval``, so a migration always lands before the
next plan is due even on a machine with no idle time (there the copies cost step time instead);
the ranks agree on the smallest proposal at the step boundary (one small all-reduce per step while a
migration is in flight, which also carries "a copy failed"). No thread competes with the steps for
the cores. When a copy failed (a peer did not answer within ``migration_timeout_s``), all ranks drop
the migration, keep the old placement, and the error is reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from meshserve.engine.device import process_group_backend
from meshserve.engine.distributed.config import EPLBConfig
from meshserve.engine.distributed.expert_map import spread_placement
from meshserve.engine.distributed.expert_parallel import ExpertParallel
from meshserve.engine.distributed.migration import Migration
from meshserve.placement import (
    BalanceConfig,
    Placement,
    make_balancer,
    migrations,
    slots_per_device,
)


def balancedness(placement: Placement, load: np.ndarray, policy: BalanceConfig | None = None) -> float:
    """vLLM's balancedness: mean over ranks / max over ranks of the token load, averaged over layers; the
    load split over replicas by ``policy``'s dispatch rule (None: the even split)."""
    per_rank = (policy or BalanceConfig()).device_load(placement, load)
    return float((per_rank.mean(axis=-1) / np.maximum(per_rank.max(axis=-1), 1e-12)).mean())


def live_policy(cfg: EPLBConfig, dispatch: str) -> BalanceConfig:
    """The planners' knobs for a live balancer whose ranks dispatch by ``dispatch`` (ep_dispatch): under
    ``balanced`` its plans are applied and scored as the simulator does (BalanceConfig.applied: the replica
    groups joined so the step's levelling reaches every rank; device_load: the balanced split's loads)."""
    return BalanceConfig(
        num_redundant_experts=cfg.num_redundant_experts,
        window_size=cfg.window_size,
        step_interval=cfg.step_interval,
        dispatch=dispatch,
    )


class LiveBalancer:
    """Per-rank EPLB state: the load window, the planner (used on rank 0) and the migration in flight."""

    def __init__(
        self, ep: ExpertParallel, cfg: EPLBConfig, rank: int, world_size: int, group_timeout_s: float
    ) -> None:
        self.ep, self.cfg, self.rank = ep, cfg, rank
        self.group_timeout = timedelta(seconds=group_timeout_s)
        layers, experts, _ = ep.holds.shape
        self.window = np.zeros((cfg.window_size, layers, experts), dtype=np.int64)
        self.tick = 0
        self.slots = slots_per_device(experts, world_size, cfg.num_redundant_experts)
        self.hops = 1 - np.eye(world_size)  # ranks behind one switch: every peer is one hop away
        self.policy = live_policy(cfg, ep.dispatch)
        self.planner = make_balancer(cfg.balancer, self.policy, self.hops, cfg.num_redundant_experts)
        self.base = Placement(spread_placement(layers, experts, world_size, 0), self.slots)
        self.side = self._side_group()
        self.migration: Migration | None = None
        self.record: dict[str, Any] = {}
        self.budget = float(cfg.chunk_bytes)  # bytes each rank may move in the coming gap (agreed)
        self.overran = False  # the last gap's copies were still running when the next command came

    def _side_group(self) -> dist.ProcessGroup:
        """The group migration copies travel on. Its own timeout bounds only setting it up (a barrier every
        rank must reach, however loaded the machine): each copy waits ``migration_timeout_s`` (Migration)."""
        return dist.new_group(backend=process_group_backend(self.ep.device), timeout=self.group_timeout)

    def after_step(self, counts: np.ndarray) -> list[dict[str, Any]]:
        """Called by every rank after every step with its expert loads; returns migration records."""
        self.window[self.tick % self.cfg.window_size] = counts
        self.tick += 1
        if self.migration is not None:
            return self._poll()
        if self.tick >= self.cfg.window_size and self.tick % self.cfg.step_interval == 0:
            return self._plan()
        return []

    def between_steps(self, command_waiting: Callable[[], bool]) -> None:
        """This gap's share of a non-invasive migration (the worker calls it after replying to a step)."""
        migration = self.migration
        if migration is None or migration.done or self.record.get("error"):
            return
        self._advance(self.budget)
        self.overran = command_waiting()

    def _plan(self) -> list[dict[str, Any]]:
        load = torch.from_numpy(self.window.sum(axis=0).astype(np.float64))
        dist.reduce(load, dst=0)
        layers, experts, ranks = self.ep.holds.shape
        new = torch.zeros(layers, experts, ranks, dtype=torch.uint8)
        current = Placement(self.ep.holds, self.slots)
        if self.rank == 0:
            plan = self.policy.applied(self.planner.plan(load.numpy(), current, self.base), load.numpy())
            new = torch.from_numpy(plan.holds.astype(np.uint8))
        dist.broadcast(new, src=0)
        target = Placement(new.numpy().astype(bool), self.slots)
        target.validate()
        if (target.holds == current.holds).all():
            return []
        moves = migrations(current, target, self.hops)
        self.record = {
            "tick": self.tick,
            "mode": self.cfg.mode,
            "balancer": self.cfg.balancer,
            "copies": len(moves),
            "bytes": len(moves) * self.ep.expert_bytes(),
            "balancedness_before": balancedness(current, load.numpy(), self.policy),
            "balancedness_after": balancedness(target, load.numpy(), self.policy),
            "holds_before": current.holds,
            "holds_after": target.holds,
            "load": load.numpy(),
        }
        self._started = time.perf_counter()
        self.migration = Migration(
            target.holds, moves, self.ep, self.side, self.cfg.chunk_bytes, self.cfg.migration_timeout_s
        )
        if self.cfg.mode == "invasive":
            self._advance(float("inf"))
            return self._poll()
        self.budget, self.overran = self._budget_floor(), False
        return [{**self.record, "final": False}]

    def _advance(self, budget: float) -> None:
        try:
            self.migration.advance(budget)
        except Exception as err:  # noqa: BLE001 - a stalled or broken copy becomes a reported error
            self.record["error"] = f"rank {self.rank}: {type(err).__name__}: {err}".strip()

    def _proposed_budget(self) -> float:
        """The next gap's budget as this rank sees it: grow while the copies fit in the gaps, halve when
        they ran into the next step (the wait for a step command is the idle time being measured)."""
        grown = self.budget / 2 if self.overran else self.budget * 1.5
        return max(self._budget_floor(), grown)

    def _budget_floor(self) -> float:
        """The least a gap moves: one chunk, and enough to finish within ``step_interval`` steps."""
        return max(float(self.cfg.chunk_bytes), self.migration.max_rank_bytes / self.cfg.step_interval)

    def _poll(self) -> list[dict[str, Any]]:
        """At a step boundary: agree on failure and the next gap's budget; switch once every chunk is in."""
        failed = self.record.get("error") is not None
        flags = torch.tensor([float(failed), -self._proposed_budget()], dtype=torch.float64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            errors: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(errors, self.record.get("error"))
            self.side = self._side_group()  # the old one may hold a half-done send
            message = "; ".join(e for e in errors if e)
            return self._finish(error=f"expert migration stalled ({message}); the old placement serves on")
        if not self.migration.done:
            self.budget = -float(flags[1])  # the smallest proposal: no rank's gap is overrun on purpose
            return []
        switch = time.perf_counter()
        self.ep.install(self.migration.new)
        return self._finish(switch_s=time.perf_counter() - switch)

    def _finish(self, **result: Any) -> list[dict[str, Any]]:
        record = {
            **self.record,
            **result,
            "final": True,
            "switch_tick": self.tick,
            "migration_s": time.perf_counter() - self._started,
        }
        self.migration, self.record = None, {}
        return [record]

    def close(self) -> None:
        self.migration = self.side = None  # the side group's threads end with its last reference
