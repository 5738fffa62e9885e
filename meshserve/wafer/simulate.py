"""One decode step of an MoE model on a platform, phase by phase.

An MoE layer = attention compute -> attention output reduction (all-reduce, or reduce-scatter +
wafer all-gather for hierarchical mappings) -> MoE dispatch -> expert compute -> MoE combine ->
the output's return to every TP member (the ``output_return`` cost, presets/costs.yaml).
Phases run one after another (no overlap); the layer's time is their sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from meshserve.errors import InputError
from meshserve.wafer import compute
from meshserve.wafer.costs import Costs, default_costs
from meshserve.wafer.hardware import Hardware
from meshserve.wafer.mapping import Mapping, expert_placement
from meshserve.wafer.models import MoEModel
from meshserve.wafer.timemodel import PhaseTime, collective_time
from meshserve.wafer.topology import Topology, topology_for
from meshserve.wafer.traffic import attention_collectives, combine, device_share, dispatch, output_return

DEFAULT_CONTEXT = 4096  # context tokens per decoding sequence (KV-cache reads)


@dataclass(frozen=True, eq=False)
class LayerResult:
    """Phases of one MoE layer (communication phases carry link loads) and what they add up to."""

    phases: list[PhaseTime]
    attention_loads: np.ndarray  # [L] bytes on each link during the attention reduction
    moe_loads: np.ndarray  # [L] bytes on each link during dispatch + combine
    expert_s: np.ndarray  # [N] expert compute seconds per device
    time_model: str

    def phase(self, name: str) -> PhaseTime:
        return next(p for p in self.phases if p.name == name)

    @property
    def comm_s(self) -> float:
        return sum(p.time_s for p in self.phases if p.model != "roofline")

    @property
    def attention_comm_s(self) -> float:
        return self.comm_s - self.all_to_all_s - self.return_s

    @property
    def return_s(self) -> float:
        """The MoE output's return after the combine (0 with the ``output_return`` cost off)."""
        return sum(p.time_s for p in self.phases if p.name.startswith(RETURN))

    @property
    def all_to_all_s(self) -> float:
        return self.phase("dispatch").time_s + self.phase("combine").time_s

    @property
    def compute_s(self) -> float:
        return sum(p.time_s for p in self.phases if p.model == "roofline")

    @property
    def total_s(self) -> float:
        return self.comm_s + self.compute_s


RETURN = "return "  # the name prefix of the output-return phases (traffic.output_return)


def return_phases(
    topo: Topology,
    mapping: Mapping,
    tokens_per_group: float,
    token_bytes: float,
    time_model: str,
    costs: Costs,
) -> list[PhaseTime]:
    """The MoE output's way back to every TP member after the combine (traffic.output_return),
    timed; none with the ``output_return`` cost off. Every simulator charges it through here."""
    if not costs.output_return:
        return []
    return [
        collective_time(topo, c, time_model) for c in output_return(mapping, tokens_per_group, token_bytes)
    ]


def _compute_phase(name: str, seconds: float, num_links: int) -> PhaseTime:
    return PhaseTime(name, seconds, 0.0, 0.0, -1, 0.0, np.zeros(num_links), "roofline")


def simulate_layer(
    hw: Hardware,
    model: MoEModel,
    mapping: Mapping,
    tokens_per_device: float,
    *,
    prefill_tokens_per_device: float = 0.0,
    prompt: int = 0,
    placement: np.ndarray | None = None,
    expert_load: np.ndarray | None = None,
    ep: int | None = None,
    context: int = DEFAULT_CONTEXT,
    time_model: str = "bottleneck",
    costs: Costs | None = None,
) -> LayerResult:
    """Evaluate one MoE layer in decode, or in a step that also runs prompts: prefill_tokens_per_device
    of the tokens_per_device are tokens of ``prompt``-token prompts (compute.attention_s).

    tokens_per_device: decode tokens per device; a TP group holds tokens_per_device * TP tokens.
    placement [experts, devices] (default: mapping-independent round-robin over ep devices) and
    expert_load [experts] (default uniform) decide where routed tokens go. costs: which costs
    beyond the paper's are charged (None: presets/costs.yaml; here only ``output_return``).
    """
    if not 0 < tokens_per_device < math.inf:  # also refuses NaN
        raise InputError("tokens_per_device", f"must be a finite number > 0, got {tokens_per_device}")
    if context < 0:
        raise InputError("context", f"must be >= 0, got {context}")
    if not 0 <= prefill_tokens_per_device <= tokens_per_device:
        raise InputError(
            "prefill_tokens_per_device",
            f"must be in [0, tokens_per_device={tokens_per_device}], got {prefill_tokens_per_device}",
        )
    if prefill_tokens_per_device and prompt < 1:
        raise InputError("prompt", f"must be >= 1 token when prefill tokens run, got {prompt}")
    topo = topology_for(hw)
    if mapping.num_devices != topo.num_devices:
        raise InputError("mapping", f"covers {mapping.num_devices} devices; {hw.name} has {topo.num_devices}")
    if placement is None:
        placement = expert_placement(model.routed_experts, topo.num_devices, ep)
    tokens = tokens_per_device * mapping.tp
    links = topo.num_links
    attn = [
        collective_time(topo, c, time_model)
        for c in attention_collectives(mapping, tokens, model.token_bytes)
    ]
    d = dispatch(mapping, placement, tokens, model.top_k, model.token_bytes, expert_load)
    dispatch_t = collective_time(topo, d, time_model)
    combine_t = collective_time(topo, combine(d), time_model)
    copies = mapping.num_groups * tokens * model.top_k * device_share(placement, expert_load)
    expert_s = compute.experts_s(hw.die, model, placement, copies, tokens, mapping.tp)
    prefill = prefill_tokens_per_device * mapping.tp
    attention = compute.attention_s(hw.die, model, tokens, mapping.tp, context, prefill, prompt)
    phases = [
        _compute_phase("attention", attention, links),
        *attn,
        dispatch_t,
        _compute_phase("experts", float(expert_s.max()), links),
        combine_t,
        *return_phases(topo, mapping, tokens, model.token_bytes, time_model, costs or default_costs()),
    ]
    return LayerResult(
        phases=phases,
        attention_loads=sum(p.loads for p in attn),
        moe_loads=dispatch_t.loads + combine_t.loads,
        expert_s=expert_s,
        time_model=time_model,
    )


def dense_layer_s(
    hw: Hardware,
    model: MoEModel,
    mapping: Mapping,
    layer: LayerResult,
    tokens_per_device: float,
    context: int = DEFAULT_CONTEXT,
) -> float:
    """A dense (non-MoE) layer: attention + its reduction + TP-split FFN + a second reduction."""
    tokens = tokens_per_device * mapping.tp
    ffn = compute.dense_ffn_s(hw.die, model, tokens, mapping.tp)
    return layer.phase("attention").time_s + 2 * layer.attention_comm_s + ffn


def step_s(
    hw: Hardware,
    model: MoEModel,
    mapping: Mapping,
    layer: LayerResult,
    tokens_per_device: float,
    context: int = DEFAULT_CONTEXT,
) -> float:
    """One decode step through every layer (dense layers first, then MoE layers)."""
    dense = dense_layer_s(hw, model, mapping, layer, tokens_per_device, context)
    return model.first_dense_layers * dense + model.num_moe_layers * layer.total_s
