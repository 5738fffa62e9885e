"""A device's MoE time as planners see it: the expert roofline, so a replica costs its weight reads.

Token counts miss that a replica makes its die read one more expert's weights every step: below
the roofline ridge (decode) a token-balanced layer can be slower than an unbalanced one. Planners
given a :class:`DeviceCost` pack replicas by predicted time, add a replica only where it lowers
the layer's time, and keep a layer's current table when a plan would not lower its time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from meshserve.placement.plan import count_true


@dataclass(frozen=True, eq=False)
class DeviceCost:
    """Predicted seconds of a device's MoE step: the roofline of its experts, plus the all-to-all.

    Roofline: the slower of compute (fixed_compute_s + tokens x compute_s_per_token) and HBM reads
    (fixed_memory_s + experts x weight_s_per_expert + tokens x io_s_per_token: each active
    expert's weights once, every routed token's activation in and out); fixed terms are work every
    device does (shared experts). a2a_phases: per all-to-all phase (dispatch, combine) a
    [devices, links] array of link seconds per routed token a device serves; a phase lasts as
    long as its hottest link. Empty: the all-to-all is left out. Without it a layout whose every
    die is HBM-bound on two experts' weights looks as fast as any other, however unbalanced its
    tokens, and its all-to-all is not.
    """

    compute_s_per_token: float
    weight_s_per_expert: float
    io_s_per_token: float
    fixed_compute_s: float = 0.0
    fixed_memory_s: float = 0.0
    a2a_phases: tuple[np.ndarray, ...] = ()

    def time(self, tokens: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """Roofline seconds of devices serving ``tokens`` routed copies through ``experts`` active experts."""
        compute = self.fixed_compute_s + np.asarray(tokens) * self.compute_s_per_token
        memory = self.fixed_memory_s + np.asarray(experts) * self.weight_s_per_expert
        return np.maximum(compute, memory + np.asarray(tokens) * self.io_s_per_token)

    @cached_property
    def a2a_s_per_token(self) -> float:
        """A token's all-to-all seconds on its device's own busiest link, mean over devices and summed
        over phases: how packing one replica by one weighs a device's tokens (the exact all-to-all
        depends on every device's tokens at once; :func:`layer_time` uses it)."""
        return float(sum(m.max(axis=1).mean() for m in self.a2a_phases))

    def score(self, tokens: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """A device's own share of the layer time: its roofline plus its tokens' all-to-all."""
        return self.time(tokens, experts) + np.asarray(tokens) * self.a2a_s_per_token

    def a2a_time(self, tokens: np.ndarray) -> np.ndarray:
        """All-to-all seconds of device tokens [..., devices] -> [...]: each phase's hottest link."""
        out = np.zeros(np.shape(tokens)[:-1])
        for phase in self.a2a_phases:
            out = out + (np.asarray(tokens, dtype=np.float32) @ phase).max(axis=-1)
        return out


def device_tokens(holds: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Tokens per device [layers, devices]: replicas split their expert's tokens evenly."""
    reps = np.maximum(count_true(holds, 2), 1)
    return np.einsum("le,led->ld", load / reps, holds)


def device_use(holds: np.ndarray, load: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, active experts) per device [layers, devices]: a device reads the weights of the
    experts it holds that get tokens (load: [layers, experts] tokens per expert)."""
    return device_tokens(holds, load), count_true(holds & (load > 0)[:, :, None], 1)


def layer_time(holds: np.ndarray, load: np.ndarray, cost: DeviceCost) -> np.ndarray:
    """Predicted MoE time of each layer, [layers]: its slowest device's roofline plus its all-to-all."""
    tokens, active = device_use(holds, load)
    return cost.time(tokens, active).max(axis=1) + cost.a2a_time(tokens)


def max_score(holds: np.ndarray, load: np.ndarray, cost: DeviceCost) -> np.ndarray:
    """The highest device score (DeviceCost.score) of each layer, [layers]: packing's own measure."""
    tokens, active = device_use(holds, load)
    return cost.score(tokens, active).max(axis=1)


def keep_faster(holds: np.ndarray, current: np.ndarray, load: np.ndarray, cost: DeviceCost) -> np.ndarray:
    """``holds`` in the layers where it lowers the predicted time on ``load``, ``current`` elsewhere.

    So a plan never raises a layer's predicted time (a layer it would not speed up moves nothing).
    """
    faster = layer_time(holds, load, cost) < layer_time(current, load, cost)
    return np.where(faster[:, None, None], holds, current)
