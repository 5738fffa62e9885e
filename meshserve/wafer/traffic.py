"""Collectives as traffic matrices T[src, dst] (bytes), ready for Topology.link_loads.

Each collective also records how many sequential steps it takes (a ring all-reduce over p
members: 2 (p - 1) steps), which the time model multiplies by the slowest route's latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshserve.errors import InputError
from meshserve.wafer.mapping import Mapping


@dataclass(frozen=True, eq=False)
class Collective:
    """One communication phase: bytes per (src, dst) device pair and its sequential step count."""

    name: str
    traffic: np.ndarray  # [N, N] bytes
    steps: int

    @property
    def total_bytes(self) -> float:
        return float(self.traffic.sum())


def ring(name: str, num_devices: int, rings: np.ndarray, message_bytes: float, phases: int) -> Collective:
    """Ring collective over rings[r] (device order): `phases` rounds of (p-1) steps of M/p each.

    Reduce-scatter or all-gather: phases=1; all-reduce: phases=2. Each member sends
    phases * (p-1)/p * M bytes to its ring successor.
    """
    rings = np.asarray(rings)
    p = rings.shape[1]
    traffic = np.zeros((num_devices, num_devices))
    if p > 1:
        traffic[rings, np.roll(rings, -1, axis=1)] = phases * (p - 1) / p * message_bytes
    return Collective(name, traffic, phases * (p - 1))


def attention_collectives(m: Mapping, tokens_per_group: float, token_bytes: float) -> list[Collective]:
    """The attention output reduction: the mapping's ring collectives in order (a flat mapping's
    all-reduce in each TP group; a hierarchical one adds an all-gather between wafers).

    Each member starts with its group's tokens; a reduce-scatter over p leaves 1/p of them, an
    all-gather over p collects p times what each member had, an all-reduce keeps the size.
    """
    data = tokens_per_group * token_bytes
    out = []
    for op, over in m.reading.attention:
        rings = m.ring_members(over)
        p = rings.shape[1]
        name = op if over == "tp-group" else f"wafer {op}"
        if op == "all-gather":
            data *= p
        out.append(ring(name, m.num_devices, rings, data, phases=2 if op == "all-reduce" else 1))
        if op == "reduce-scatter":
            data /= p
    return out


DUAL = {"all-reduce": "all-reduce", "reduce-scatter": "all-gather", "all-gather": "reduce-scatter"}


def output_return(m: Mapping, tokens_per_group: float, token_bytes: float) -> list[Collective]:
    """The MoE output's way back after the combine: the attention collectives undone, last first.

    A die holds, after the combine, its experts' outputs for the tokens it dispatched: a partial
    sum of each token's top-k (flat mappings: the experts of its FTD) or its shard of tokens
    gathered from other wafers (hierarchical). The next attention needs every group token whole
    on every TP member, so each collective is undone by its dual (all-gather <-> reduce-scatter;
    an all-reduce of partial sums stays one), on the same rings with the same bytes.
    """
    return [
        Collective(f"return {DUAL[c.name.removeprefix('wafer ')]}", c.traffic, c.steps)
        for c in reversed(attention_collectives(m, tokens_per_group, token_bytes))
    ]


def device_share(placement: np.ndarray, expert_load: np.ndarray | None = None) -> np.ndarray:
    """[N] fraction of all routed (token, expert) copies that each device serves.

    placement[e, d]: fraction of expert e's tokens served by device d (rows sum to 1).
    expert_load[e]: tokens routed to expert e (any scale; uniform when None).
    """
    placement = np.asarray(placement, dtype=np.float64)
    if placement.ndim != 2 or not np.allclose(placement.sum(axis=1), 1.0) or (placement < 0).any():
        raise InputError("placement", "must be [experts, devices], non-negative, each row summing to 1")
    e = placement.shape[0]
    load = np.ones(e) if expert_load is None else np.asarray(expert_load, dtype=np.float64)
    if load.shape != (e,) or (load < 0).any() or load.sum() <= 0:
        raise InputError("expert_load", f"must be {e} non-negative numbers with a positive sum")
    return (load / load.sum()) @ placement


def dispatch(
    m: Mapping,
    placement: np.ndarray,
    tokens_per_group: float,
    top_k: int,
    token_bytes: float,
    expert_load: np.ndarray | None = None,
) -> Collective:
    """MoE all-to-all dispatch: every token goes to its top_k experts' devices (one copy each).

    Every die sends the tokens it holds after the attention collectives to the devices of its
    all-to-all domain (``m.domain_of``). Flat mappings' FTD rule: group g's tokens for experts on
    device x leave from g's member in x's FTD. Hierarchical mappings gather every wafer's tokens
    first, so the domains can stay inside one wafer (``her``: the whole wafer, each die holding a
    shard; ``her-ftd``: the wafer's FTD blocks, each die holding its group's and its counterparts'
    full tokens) and no byte of the all-to-all leaves a wafer.
    """
    share = device_share(placement, expert_load)
    if share.shape[0] != m.num_devices:
        raise InputError("placement", f"has {share.shape[0]} devices; the mapping has {m.num_devices}")
    held = tokens_per_group * m.held_tokens_factor
    same = m.domain_of[:, None] == m.domain_of[None, :]
    traffic = np.where(same, held * top_k * token_bytes * share[None, :], 0.0)
    np.fill_diagonal(traffic, 0.0)  # a device's own tokens for its own experts never touch a link
    return Collective("dispatch", traffic, 1)


def combine(d: Collective) -> Collective:
    """MoE all-to-all combine: every expert output returns to the device that sent the token."""
    return Collective("combine", d.traffic.T.copy(), d.steps)
