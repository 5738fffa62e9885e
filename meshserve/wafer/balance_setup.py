"""One balancing experiment, end to end: presets -> trace -> comm model -> iteration simulation.

:class:`BalanceSetup` names a model, platform, TP degree, mapping, decode batch and balancer;
:func:`run_setup` builds the platform's routes and FTDs from the simulator core, the routed
expert roofline, a synthetic (or recorded) trace, and runs :func:`simulate_iterations`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import sparse

from meshserve.errors import InputError, require
from meshserve.placement import DeviceCost, Placement
from meshserve.traces import ExpertTrace
from meshserve.wafer import compute
from meshserve.wafer.balance import (
    BALANCERS,
    BalanceConfig,
    make_balancer,
    slots_per_device,
    static_placement,
)
from meshserve.wafer.capacity import Fit, die_memory, require_fit
from meshserve.wafer.comm_model import CommModel, ExpertCost, LinkMap
from meshserve.wafer.costs import Costs, default_costs
from meshserve.wafer.fair_a2a import FairPhase
from meshserve.wafer.hardware import Hardware, load_hardware
from meshserve.wafer.iteration import IterationResult, check_trace, simulate_iterations
from meshserve.wafer.limits import check_iterations
from meshserve.wafer.mapping import Mapping, make_mapping
from meshserve.wafer.models import MoEModel, load_model
from meshserve.wafer.simulate import return_phases
from meshserve.wafer.synthetic import synthetic_trace
from meshserve.wafer.timemodel import TIME_MODELS, collective_time, latency_s
from meshserve.wafer.topology import Topology, topology_for
from meshserve.wafer.traffic import Collective, attention_collectives, dispatch


@dataclass(frozen=True)
class BalanceSetup:
    """One iteration-level experiment.

    mapping: None picks the platform's best: hierarchical ER (``her``) on several wafers, ER on
    one wafer, ``baseline`` on switch platforms. tokens_per_device: decode tokens each device
    owns (a TP group of ``tp`` devices runs ``tp * tokens_per_device`` tokens through attention).
    trace: path of a recorded trace; None draws a synthetic one (``scenario``, ``seed``,
    ``zipf_exponent``: routing skew, None = the synthetic default).
    expert_weight_bytes: bytes per routed-expert weight (1 = FP8 weights, compute unchanged);
    None = what a recorded trace says its engine held (a quantized engine records
    it), else the model preset's element size. wafer_link_gb_per_s: overrides the platform's
    inter-wafer port bandwidth (multi-wafer meshes). time_model: how communication is timed
    (timemodel.TIME_MODELS; CommModel). costs: what is charged beyond the paper's model
    (costs.py; presets/costs.yaml holds the realistic defaults).
    """

    model: str = "deepseek-v3"
    hardware: str = "wsc-4x8x8"
    tp: int = 4
    mapping: str | None = None
    tokens_per_device: int = 64
    balancer: str = "ni"
    scenario: str = "mixed"
    iterations: int = 200
    seed: int = 0
    config: BalanceConfig = field(default_factory=BalanceConfig)
    trace: str | None = None
    zipf_exponent: float | None = None
    expert_weight_bytes: float | None = None
    wafer_link_gb_per_s: float | None = None
    time_model: str = "bottleneck"
    costs: Costs = field(default_factory=default_costs)

    def platform(self) -> Hardware:
        """The hardware preset with this setup's inter-wafer bandwidth, if it sets one."""
        hw = load_hardware(self.hardware)
        if self.wafer_link_gb_per_s is None:
            return hw
        gb = self.wafer_link_gb_per_s
        require(
            hw.kind == "mesh" and hw.wafers > 1, "wafer_link_gb_per_s", f"{hw.name} has no inter-wafer ports"
        )
        require(gb > 0, "wafer_link_gb_per_s", f"must be > 0, got {gb}")
        return dataclasses.replace(hw, wafer_link_bandwidth=gb * 1e9)

    def resolved_mapping(self, hw: Hardware) -> str:
        if self.mapping is not None:
            return self.mapping
        if hw.kind != "mesh":
            return "baseline"
        return "her" if hw.wafers > 1 else "er"

    def fit(self) -> Fit:
        """HBM per die this point needs (weights, replicas, KV at ``costs.context_tokens``)."""
        hw, model = self.platform(), load_model(self.model)
        slots = slots_per_device(model.routed_experts, hw.num_devices, redundant_experts(self, hw, model))
        return die_memory(
            model,
            hw,
            self.tp,
            slots,
            self.tokens_per_device,
            self.costs.context_tokens,
            self.weight_bytes(),
        )

    def weight_bytes(self) -> float | None:
        """Bytes per routed-expert weight: the setting, else what a recorded trace's engine held (a
        quantized engine records it), else None (the model's element size)."""
        if self.expert_weight_bytes is not None or self.trace is None:
            return self.expert_weight_bytes
        recorded = ExpertTrace.load(self.trace).meta.get("expert_weight_bytes")
        return None if recorded is None else float(recorded)

    def check(self) -> None:
        """Validate everything cheap to validate (presets, TP, mapping, balancer) without running."""
        hw, model = self.platform(), load_model(self.model)
        make_mapping(hw, self.tp, self.resolved_mapping(hw))
        require(self.tokens_per_device >= 1, "batch", f"must be >= 1, got {self.tokens_per_device}")
        require(self.iterations >= 1, "iterations", f"must be >= 1, got {self.iterations}")
        check_iterations(hw, self.iterations, model.num_moe_layers, model.routed_experts)
        require(
            self.time_model in TIME_MODELS,
            "time_model",
            f"unknown {self.time_model!r}; allowed: {', '.join(TIME_MODELS)}",
        )
        require(
            self.balancer in BALANCERS,
            "balancer",
            f"unknown {self.balancer!r}; allowed: {', '.join(BALANCERS)}",
        )
        if self.trace is not None:
            counts = ExpertTrace.load(self.trace).target().counts  # the served model's layers
            try:
                check_trace(counts, model.num_moe_layers, model.routed_experts)
            except InputError as err:  # name the file, as every other fault of a trace file does
                raise InputError(f"trace {self.trace}", err.message) from None


def a2a_domains(mapping: Mapping) -> np.ndarray:
    """[devices] all-to-all domain of each device (its FTD, its wafer, or its FTD on its wafer).

    The all-to-all never crosses a domain border, so links between domains are idle during it
    (NI-Balancer's global steps) and links inside a domain are busy (its local steps wait for
    the all-reduce).
    """
    return mapping.domain_of.copy()


def a2a_per_slot(topo: Topology, unit: np.ndarray, slots: float) -> tuple[np.ndarray, np.ndarray]:
    """Link bytes per routed (token, expert) slot that each device serves: (dispatch, combine).

    The all-to-all is linear in the devices' loads, so one traffic matrix ``unit`` [src, dst]
    with one expert per device and uniform load (``slots`` per device; the core's own FTD rules,
    traffic.dispatch) gives every column. Returns two [devices, links] arrays: a layer's link
    bytes = device_load @ them.
    """
    n = topo.num_devices
    s, d = np.nonzero(unit)
    w = unit[s, d] / slots
    to_dst = sparse.csr_matrix((w, (d, s * n + d)), shape=(n, n * n)) @ topo.incidence
    to_src = sparse.csr_matrix((w, (d, d * n + s)), shape=(n, n * n)) @ topo.incidence
    return to_dst.toarray(), to_src.toarray()


@lru_cache(maxsize=16)
def comm_model(
    hw: Hardware,
    tp: int,
    mapping_kind: str,
    model: MoEModel,
    tokens_per_device: int,
    time_model: str = "bottleneck",
    costs: Costs | None = None,
) -> CommModel:
    """Routes, FTDs, all-to-all per-slot link loads and all-reduce link loads of one layout (cached).

    costs: the output return, the migration ceiling and HBM charge (None: presets/costs.yaml).
    """
    costs = default_costs() if costs is None else costs
    topo = topology_for(hw)
    mapping = make_mapping(hw, tp, mapping_kind)
    tokens_per_group = tp * tokens_per_device
    unit = dispatch(mapping, np.eye(topo.num_devices), tokens_per_group, 1, model.token_bytes)
    slots = tokens_per_group * mapping.num_groups / topo.num_devices
    disp, comb = a2a_per_slot(topo, unit.traffic, slots)
    phases = [
        collective_time(topo, c, time_model)
        for c in attention_collectives(mapping, tokens_per_group, model.token_bytes)
    ]
    returned = return_phases(topo, mapping, tokens_per_group, model.token_bytes, time_model, costs)
    domains, bw = a2a_domains(mapping), topo.link_bandwidth
    # a balanced dispatch first gathers every domain member's per-expert counts (int32)
    peers = (domains[:, None] == domains[None, :]) & ~np.eye(topo.num_devices, dtype=bool)
    counts = Collective("count all-gather", np.where(peers, 4.0 * model.routed_experts, 0.0), 1)
    fair = (
        None
        if time_model == "bottleneck"
        else tuple(
            FairPhase.build(topo.incidence, bw, unit.traffic, slots, domains, combine=back)
            for back in (False, True)
        )
    )
    return CommModel(
        hops=topo.hops,
        ftd=domains,
        routes=topo.incidence,
        bandwidth=bw,
        path_latency=topo.path_latency,
        dispatch=LinkMap.from_matrix(disp, domains, bw),
        combine=LinkMap.from_matrix(comb, domains, bw),
        a2a_latency=latency_s(topo, unit),
        allreduce_bytes=np.sum([p.loads for p in phases], axis=0),
        allreduce_time=float(sum(p.time_s for p in phases)),
        count_exchange_time=collective_time(topo, counts, time_model).time_s,
        time_model=time_model,
        fair=fair,
        return_time=float(sum(p.time_s for p in returned)),
        migration_ceiling=costs.migration_link_ceiling,
        migration_hbm=costs.migration_hbm,
    )


def expert_cost(model: MoEModel, hw: Hardware, weight_bytes: float | None = None) -> ExpertCost:
    """The iteration simulator's expert roofline (compute.expert_cost; shared experts left out)."""
    return compute.expert_cost(model, hw.die, weight_bytes)


def setup_trace(setup: BalanceSetup, model: MoEModel, num_devices: int) -> ExpertTrace:
    """The recorded trace (checked against the model) or a synthetic one for this batch."""
    if setup.trace is not None:
        trace = ExpertTrace.load(setup.trace).target()  # a draft's MoE layers are not the preset's
        return dataclasses.replace(trace, counts=trace.counts[: setup.iterations])
    return drawn_trace(
        model,
        setup.tokens_per_device * num_devices,
        setup.iterations,
        setup.scenario,
        setup.seed,
        setup.zipf_exponent,
    )


@lru_cache(maxsize=4)
def drawn_trace(
    model: MoEModel, tokens_per_step: int, steps: int, scenario: str, seed: int, zipf_exponent: float | None
) -> ExpertTrace:
    """A synthetic trace, drawn once per distinct setting: a ladder's rungs on one platform and
    steady_gap share it (read-only)."""
    trace = synthetic_trace(
        model=model.name,
        num_layers=model.num_moe_layers,
        num_experts=model.routed_experts,
        top_k=model.top_k,
        tokens_per_step=tokens_per_step,
        steps=steps,
        scenario=scenario,
        seed=seed,
        **({} if zipf_exponent is None else {"zipf_exponent": zipf_exponent}),
    )
    trace.counts.flags.writeable = False
    return trace


def redundant_experts(setup: BalanceSetup, hw: Hardware, model: MoEModel) -> int:
    """The setup's redundant replicas per layer (None: one per device), checked to fit."""
    n = hw.num_devices
    redundant = n if setup.config.num_redundant_experts is None else setup.config.num_redundant_experts
    most = model.routed_experts * n - max(model.routed_experts, n)
    require(
        redundant <= most,
        "num_redundant_experts",
        f"{redundant} replicas do not fit: at most {most} (one copy of every expert on every device)",
    )
    return redundant


@dataclass(frozen=True)
class SetupParts:
    """What a run of a setup is made of (run_setup simulates it; steady.py re-plans on it)."""

    comm: CommModel
    trace: ExpertTrace
    redundant: int  # replicas per layer beyond one per expert
    base: Placement  # the static layout every run starts from
    cost: ExpertCost  # the simulator's expert roofline
    planner_cost: DeviceCost  # the same roofline plus the all-to-all, as planners see a device


def setup_parts(setup: BalanceSetup) -> SetupParts:
    """Build ``setup``'s comm model, trace, replicas, starting layout and costs (checked)."""
    setup.check()
    hw, model = setup.platform(), load_model(setup.model)
    mapping = setup.resolved_mapping(hw)
    comm = comm_model(hw, setup.tp, mapping, model, setup.tokens_per_device, setup.time_model, setup.costs)
    n = hw.num_devices
    redundant = redundant_experts(setup, hw, model)
    slots = slots_per_device(model.routed_experts, n, redundant)
    base = static_placement(model.num_moe_layers, model.routed_experts, n, slots)
    cost = expert_cost(model, hw, setup.weight_bytes())
    return SetupParts(
        comm,
        setup_trace(setup, model, n),
        redundant,
        base,
        cost,
        cost.device_cost(a2a_phases=comm.a2a_seconds_per_token()),
    )


def run_setup(setup: BalanceSetup, refuse_unfit: bool = True) -> IterationResult:
    """Simulate ``setup.iterations`` decode iterations with the setup's balancer.

    With the capacity check on, a point whose die memory does not fit is refused (InputError
    naming the numbers) unless ``refuse_unfit`` is False: tables and curves simulate it and mark
    it (the result's ``fit``).
    """
    fit = setup.fit()
    if setup.costs.check_capacity and refuse_unfit:
        require_fit(fit, f"{setup.model} on {setup.hardware} at {setup.tokens_per_device} tokens/device")
    p = setup_parts(setup)
    balancer = make_balancer(setup.balancer, setup.config, p.comm.hops, p.redundant, p.planner_cost)
    result = simulate_iterations(p.trace.counts, p.trace.tokens_per_step(), balancer, p.base, p.comm, p.cost)
    result.fit = fit if setup.costs.check_capacity else None
    return result


def run_marked(setup: BalanceSetup) -> IterationResult:
    """run_setup that simulates a point that does not fit and marks it (tables, curves, plots)."""
    return run_setup(setup, refuse_unfit=False)


def run_summary(setup: BalanceSetup) -> dict:
    """run_setup as one flat row: the setup's fields and the run's summary."""
    result = run_marked(setup)
    hw = load_hardware(setup.hardware)
    row = {
        "model": setup.model,
        "hardware": setup.hardware,
        "tp": setup.tp,
        "mapping": setup.resolved_mapping(hw),
        "tokens_per_device": setup.tokens_per_device,
        "balancer": setup.balancer,
        "scenario": setup.scenario,
        "seed": setup.seed,
    }
    return {**row, **result.summary()}
