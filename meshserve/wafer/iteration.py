"""Iteration-level simulation of MoE decode with expert load balancing.

Per decode iteration and MoE layer: tokens per device from the trace and the placement; MoE
compute time = the slowest device's roofline (its experts' weights read from HBM, or its FLOPs);
all-to-all dispatch and combine time from link loads; attention all-reduce time (constant per
layer). Balancers add stall time (invasive migration: all copies cross the mesh while inference
waits) or stream copies in chunks through idle link time of the all-reduce (local steps) and of
the all-to-all (global steps).

Everything a platform and mapping contribute is in a :class:`CommModel` (built over the
simulator core by :func:`meshserve.wafer.balance_setup.comm_model`). Iterations with a
fixed placement are evaluated as one batch of matrix products; only iterations with a migration
in flight are stepped one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

from meshserve.errors import InputError
from meshserve.wafer.balance import BalanceConfig, Balancer, Placement, imbalance, migrations
from meshserve.wafer.balance.steps import split_steps
from meshserve.wafer.balance.stream import Flight
from meshserve.wafer.capacity import Fit
from meshserve.wafer.comm_model import CommModel, ExpertCost
from meshserve.wafer.timemodel import bottleneck_s


def load_ratio(max_load: np.ndarray, mean_load: np.ndarray) -> np.ndarray:
    """Max/mean device load per iteration (an idle iteration's mean counts as 1e-12, not 0)."""
    return max_load / np.maximum(mean_load, 1e-12)


@dataclass
class IterationResult:
    """Per-iteration series (length = iterations) and run totals.

    max_load, mean_load: device tokens per MoE layer (averaged over layers); compute_s, a2a_s,
    allreduce_s: summed over MoE layers; stall_s: inference stopped for migration; migrated_bytes:
    expert bytes that crossed the fabric; plans: iterations where the balancer re-planned;
    rejected_plans: where its plan would not have lowered the predicted MoE time (dropped);
    even_compute_s: the MoE compute time of an even split (every device the mean tokens through
    the fewest experts any layout gives a device): compute_s over it is the balance in time.
    return_s: the MoE output's return to the TP members after each combine (summed over layers);
    migration_hbm_s: the part of compute_s that is expert copies' HBM reads and writes;
    fit: the point's HBM per die (capacity.Fit), None with the capacity check off.
    """

    balancer: str
    tokens_per_iteration: np.ndarray
    max_load: np.ndarray
    mean_load: np.ndarray
    compute_s: np.ndarray
    a2a_s: np.ndarray
    allreduce_s: np.ndarray
    stall_s: np.ndarray
    migrated_bytes: np.ndarray
    num_devices: int
    num_layers: int
    plans: list[int] = field(default_factory=list)
    rejected_plans: list[int] = field(default_factory=list)
    max_link_utilization: float = 0.0
    even_compute_s: np.ndarray | None = None
    return_s: np.ndarray | None = None
    migration_hbm_s: np.ndarray | None = None
    fit: Fit | None = None

    @property
    def moe_time_s(self) -> np.ndarray:
        """MoE layer time per iteration: compute + all-to-all + output return + stalls."""
        back = 0.0 if self.return_s is None else self.return_s
        return self.compute_s + self.a2a_s + back + self.stall_s

    @property
    def steady(self) -> slice:
        """The iterations steady-state figures average over: the second half of the run."""
        return slice(len(self.max_load) // 2, None)

    @property
    def steady_max_over_mean(self) -> float:
        """Max/mean device load per iteration, averaged over the steady iterations."""
        return float(load_ratio(self.max_load, self.mean_load)[self.steady].mean())

    def summary(self) -> dict[str, float]:
        """Run totals: balancedness, times, bytes, per-device MoE throughput (tokens/s/device)."""
        moe = self.moe_time_s.sum()
        tokens = self.tokens_per_iteration.sum()
        half = self.steady
        return {
            "iterations": int(len(self.max_load)),
            "balancedness": float((self.mean_load / np.maximum(self.max_load, 1e-12)).mean()),
            "max_over_mean_load": float(load_ratio(self.max_load, self.mean_load).mean()),
            "max_over_mean_load_steady": self.steady_max_over_mean,
            "compute_over_even_steady": float(self.compute_s[half].sum() / self.even_compute_s[half].sum())
            if self.even_compute_s is not None and self.even_compute_s[half].sum() > 0
            else 0.0,
            "moe_compute_s": float(self.compute_s.sum()),
            "a2a_s": float(self.a2a_s.sum()),
            "allreduce_s": float(self.allreduce_s.sum()),
            "stall_s": float(self.stall_s.sum()),
            "migrated_bytes": float(self.migrated_bytes.sum()),
            "plans": len(self.plans),
            "rejected_plans": len(self.rejected_plans),
            "moe_tokens_per_s_per_device": float(tokens * self.num_layers / moe / self.num_devices)
            if moe > 0
            else 0.0,
            # the same with the attention output reduction (all-reduce, or hierarchical collectives)
            # in each layer's time: the paper does not say which of the two its Fig. 17 counts
            "moe_and_reduction_tokens_per_s_per_device": float(
                tokens * self.num_layers / (moe + self.allreduce_s.sum()) / self.num_devices
            )
            if moe > 0
            else 0.0,
            "max_migration_link_utilization": float(self.max_link_utilization),
            "return_s": float(0.0 if self.return_s is None else self.return_s.sum()),
            "migration_hbm_s": float(0.0 if self.migration_hbm_s is None else self.migration_hbm_s.sum()),
            **({} if self.fit is None else self.fit.summary()),
        }


EVEN = BalanceConfig()  # the default dispatch: replicas split their expert's tokens evenly


def check_trace(counts: np.ndarray, num_layers: int, num_experts: int) -> None:
    """Trace shape must match the model's MoE layers and routed experts."""
    if counts.ndim != 3 or counts.shape[1:] != (num_layers, num_experts):
        raise InputError(
            "trace",
            f"counts shape {tuple(counts.shape)} does not match the model: "
            f"need [steps, {num_layers} MoE layers, {num_experts} experts]",
        )


@dataclass
class _Block:
    """Per-iteration figures of a block of iterations under one placement."""

    max_load: np.ndarray
    mean_load: np.ndarray
    imbalance: np.ndarray
    compute_s: np.ndarray
    even_compute_s: np.ndarray
    a2a_s: np.ndarray
    dispatch_bytes: np.ndarray  # [S, L, a2a links]
    combine_bytes: np.ndarray
    dispatch_s: np.ndarray  # [S, L]
    combine_s: np.ndarray
    layer_s: np.ndarray  # [S, L] compute + dispatch + combine of each layer


def evaluate(
    counts: np.ndarray, placement: Placement, comm: CommModel, cost: ExpertCost, config: BalanceConfig = EVEN
) -> _Block:
    """Loads, MoE compute and all-to-all times of iterations ``counts`` [S, L, E] under a placement.

    config: its dispatch rule splits an expert's tokens among replicas (a balanced one first
    waits for the count all-gather, charged to the dispatch).
    """
    load = config.device_load(placement, counts)  # [S, L, N]
    compute = cost.device_time(load, placement.busy_experts(counts)).max(axis=2)
    fewest = -(-placement.num_experts // placement.num_devices)
    flat = load.reshape(-1, load.shape[-1])
    dispatch = comm.dispatch(flat).reshape(*load.shape[:2], -1)  # [S, L, a2a links]
    combine = comm.combine(flat).reshape(*load.shape[:2], -1)
    t_dispatch, t_combine = (t.reshape(load.shape[:2]) for t in comm.a2a_times(flat, dispatch, combine))
    if config.dispatch == "balanced":  # only layers with a replica to level wait for counts + solve
        wait = comm.count_exchange_time + config.dispatch_solve_us * 1e-6
        t_dispatch = t_dispatch + wait * (placement.replicas() > 1).any(axis=1)
    return _Block(
        max_load=load.max(axis=2).mean(axis=1),
        mean_load=load.mean(axis=2).mean(axis=1),
        imbalance=imbalance(load),
        compute_s=compute.sum(axis=1),
        even_compute_s=cost.device_time(load.mean(axis=2), fewest).sum(axis=1),
        a2a_s=(t_dispatch + t_combine).sum(axis=1),
        dispatch_bytes=dispatch,
        combine_bytes=combine,
        dispatch_s=t_dispatch,
        combine_s=t_combine,
        layer_s=compute + t_dispatch + t_combine,
    )


def faster_layers(
    history: np.ndarray,
    current: Placement,
    target: Placement,
    comm: CommModel,
    cost: ExpertCost,
    horizon: int | None = None,
    config: BalanceConfig = EVEN,
) -> Placement | None:
    """``target`` where it lowers a layer's predicted time on ``history``, ``current`` elsewhere.

    Planners balance token counts, and a replica adds its weight reads to its die: below the
    roofline ridge a token-balanced layer can get slower. Taking each layer from whichever
    placement is faster on the plan's own window means an applied plan never raises a layer's
    predicted time. horizon: an invasive plan stops inference for its copies, so it must also
    pay for its stall within the ``horizon`` iterations it will serve (the re-plan interval):
    the faster layers are taken in order of gain, as many as maximise gain x horizon - stall
    (the stall of a prefix of layers: the bottleneck time of their copies, as simulated). None
    when no layer pays.
    """
    now, then = (evaluate(history, p, comm, cost, config).layer_s.mean(axis=0) for p in (current, target))
    better = then < now
    if better.any() and horizon is not None:
        order = np.argsort(then - now)[: int(better.sum())]  # largest gain first
        better[:] = False
        better[order[: paying_layers(now - then, order, current, target, comm, cost, horizon)]] = True
    if not better.any():
        return None
    if better.all():
        return target
    holds = np.where(better[:, None, None], target.holds, current.holds)
    return Placement(holds, target.slots_per_device)


def paying_layers(
    gain: np.ndarray,
    order: np.ndarray,
    current: Placement,
    target: Placement,
    comm: CommModel,
    cost: ExpertCost,
    horizon: int,
) -> int:
    """How many layers of ``order`` to migrate at once: argmax of their gain x horizon - stall."""
    moves = migrations(current, target, comm.hops)
    n = comm.num_devices
    rank = np.empty(current.num_layers, dtype=np.int64)
    rank[order] = np.arange(len(order))
    take = rank[moves.layer] < len(order) if len(moves) else np.zeros(0, dtype=bool)
    # link bytes of each prefix of layers: per-layer copy bytes on every link, summed in gain order
    row, src, dst = rank[moves.layer[take]], moves.src[take], moves.dst[take]
    copies = sparse.csr_matrix(
        (np.full(len(row), cost.weight_bytes), (row, src * n + dst)), shape=(len(order), n * n)
    )
    latency = np.zeros(len(order))
    np.maximum.at(latency, row, comm.path_latency[src, dst])
    link_bytes = np.cumsum((copies @ comm.routes).toarray(), axis=0)
    stall = bottleneck_s(link_bytes, comm.bandwidth) + np.maximum.accumulate(latency)
    net = np.cumsum(gain[order]) * horizon - stall
    return int(net.argmax()) + 1 if net.max() > 0 else 0


def simulate_iterations(
    counts: np.ndarray,
    tokens_per_iteration: np.ndarray,
    balancer: Balancer,
    base: Placement,
    comm: CommModel,
    cost: ExpertCost,
    *,
    block_size: int = 32,
    flight_block: int = 4,
) -> IterationResult:
    """Run a balancer over a trace ``counts`` [iterations, layers, experts] (see module docstring)."""
    check_trace(counts, base.num_layers, base.num_experts)
    base.validate()
    steps_total = counts.shape[0]
    series = {
        k: np.zeros(steps_total)
        for k in (
            "max_load",
            "mean_load",
            "imbalance",
            "compute_s",
            "even_compute_s",
            "a2a_s",
            "stall_s",
            "migrated_bytes",
            "migration_hbm_s",
        )
    }
    hbm_bw = cost.die.hbm_bandwidth
    placement, flight = base, None
    since, plans, rejected, worst = 0, [], [], 0.0
    config = balancer.config
    window = config.window_size
    it = 0
    while it < steps_total:
        if flight is None and it > since and balancer.should_plan(it, series["imbalance"][since:it]):
            history = counts[max(it - window, 0) : it]
            mean = history.mean(axis=0)
            target = config.applied(balancer.plan(mean, placement, base), mean)
            target.validate()
            if config.reject_slower_plans:
                horizon = config.step_interval if balancer.invasive else None
                target = faster_layers(history, placement, target, comm, cost, horizon, config)
                if target is None:
                    rejected.append(it)  # it would not lower the predicted MoE time of any layer
                    balancer.planned(float(evaluate(history, placement, comm, cost, config).imbalance.mean()))
                    since = it
                    continue
            moves = migrations(placement, target, comm.hops)
            plans.append(it)
            series["migrated_bytes"][it] += len(moves) * cost.weight_bytes
            balancer.planned(float(evaluate(history, target, comm, cost, config).imbalance.mean()))
            if balancer.invasive or len(moves) == 0:
                nbytes = np.full(len(moves), cost.weight_bytes)
                stall = comm.transfer_time(moves.src, moves.dst, nbytes)
                if comm.migration_hbm and len(moves):  # the busiest die reads and writes its copies
                    hbm = np.bincount(moves.src, minlength=comm.num_devices)
                    hbm += np.bincount(moves.dst, minlength=comm.num_devices)
                    stall = max(stall, hbm.max() * cost.weight_bytes / hbm_bw)
                series["stall_s"][it] += stall
                placement, since = target, it
            else:
                steps = split_steps(moves, comm.ftd, comm.hops)
                flight = Flight.begin(placement, target, steps, moves.layer, cost.weight_bytes)
                placement = flight.placement()  # layers that need no copy switch at once
        # a flight usually switches a layer within a few iterations, and the rest of the block is
        # evaluated again on the new table: evaluate fewer ahead while one streams
        end = min(it + (block_size if flight is None else flight_block), steps_total)
        block = evaluate(counts[it:end], placement, comm, cost, config)
        landed = False
        if flight is not None:  # stream chunks iteration by iteration until a layer's copies all landed
            switched = flight.landed_layers().sum()
            for j in range(end - it):
                a2a = [
                    (block.dispatch_bytes[j], block.dispatch_s[j], comm.dispatch.links),
                    (block.combine_bytes[j], block.combine_s[j], comm.combine.links),
                ]
                landed, util, hbm = flight.advance(comm, a2a, config.chunk_bytes)
                worst = max(worst, util)
                if comm.migration_hbm:  # the die moving most shares HBM with the expert reads
                    series["migration_hbm_s"][it + j] = hbm.max() / hbm_bw
                if flight.landed_layers().sum() > switched:  # the next iteration runs on a new table
                    end = it + j + 1
                    break
        else:  # cut the block where the trigger fires; later iterations are redone
            hist = block.imbalance
            end = next(
                (
                    i
                    for i in range(it + 1, end)
                    if balancer.should_plan(
                        i, np.concatenate([series["imbalance"][since:it], hist[: i - it]])
                    )
                ),
                end,
            )
        for key in ("max_load", "mean_load", "imbalance", "compute_s", "even_compute_s", "a2a_s"):
            series[key][it:end] = getattr(block, key)[: end - it]
        series["compute_s"][it:end] += series["migration_hbm_s"][it:end]
        if flight is not None:
            placement = flight.placement()
            if landed:
                since, flight = end, None
        it = end
    return IterationResult(
        balancer=balancer.name,
        tokens_per_iteration=np.asarray(tokens_per_iteration, dtype=np.float64),
        max_load=series["max_load"],
        mean_load=series["mean_load"],
        compute_s=series["compute_s"],
        a2a_s=series["a2a_s"],
        allreduce_s=np.full(steps_total, comm.allreduce_time * base.num_layers),
        stall_s=series["stall_s"],
        migrated_bytes=series["migrated_bytes"],
        num_devices=base.num_devices,
        num_layers=base.num_layers,
        plans=plans,
        rejected_plans=rejected,
        max_link_utilization=worst,
        even_compute_s=series["even_compute_s"],
        return_s=np.full(steps_total, comm.return_time * base.num_layers),
        migration_hbm_s=series["migration_hbm_s"],
    )
