"""Decode compute time of one die from a roofline: max(FLOPs / peak, HBM bytes / bandwidth).

One roofline per kind of work: attention, the dense FFN, and the MoE experts (:class:`ExpertCost`,
shared by the layer simulator and the iteration simulator).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshserve.placement import DeviceCost
from meshserve.wafer.hardware import Die
from meshserve.wafer.models import MoEModel


def roofline_s(die: Die, flops: np.ndarray | float, hbm_bytes: np.ndarray | float) -> np.ndarray:
    """Seconds for work that is either compute-bound or HBM-bound, whichever is slower."""
    return np.maximum(np.asarray(flops) / die.peak_flops, np.asarray(hbm_bytes) / die.hbm_bandwidth)


def attention_s(
    die: Die,
    model: MoEModel,
    tokens_per_group: float,
    tp: int,
    context: int,
    prefill_tokens: float = 0.0,
    prompt: int = 0,
) -> float:
    """One attention block on one TP member: its 1/TP of the heads for all the group's tokens.

    Reads its share of the weights and of the KV cache (GQA: KV heads split over TP, replicated
    when TP exceeds them; MLA: the shared latent cache is read in full by every member).
    ``prefill_tokens`` of the group's tokens belong to prompts ``prompt`` tokens long: each attends
    causally to (prompt + 1) / 2 tokens on average, and a prompt's KV is written once and read once
    (it stays on chip within a query tile, flash attention's premise: optimistic for long prompts);
    the other tokens decode against ``context`` tokens each.
    """
    decode = tokens_per_group - prefill_tokens
    kv = (decode * context + 2 * prefill_tokens) * model.kv_bytes_per_token / model.kv_shards(tp)
    flops = 2 * tokens_per_group * model.attention_params / tp
    attended = decode * context + prefill_tokens * (prompt + 1) / 2
    flops += attended * model.attention_flops_per_context_token / tp
    return float(roofline_s(die, flops, model.attention_params * model.bytes_per_element / tp + kv))


def dense_ffn_s(die: Die, model: MoEModel, tokens_per_group: float, tp: int) -> float:
    """The dense FFN of the first layers, tensor-parallel over the TP group."""
    params = 3 * model.hidden_size * model.dense_intermediate_size / tp
    return float(roofline_s(die, 2 * tokens_per_group * params, params * model.bytes_per_element))


@dataclass(frozen=True)
class ExpertCost:
    """The one roofline of a device's MoE work, used by the layer and the iteration simulators.

    A device serving ``tokens`` routed (token, expert) copies through ``active_experts`` experts
    spends 2 FLOPs per expert weight per copy, reads each active expert's weights once and every
    copy's activation in and out. Shared experts are an explicit choice: ``shared_params`` is the
    device's share of their weights (its 1/TP), run for ``shared_tokens`` tokens (its TP group's);
    0 leaves them out (the iteration simulator: the same on every platform and balancer).
    """

    flops_per_token: float
    weight_bytes: float  # one routed expert's weights
    act_bytes_per_token: float
    die: Die
    shared_params: float = 0.0
    bytes_per_element: float = 2.0

    def device_cost(self, shared_tokens: float = 0.0, a2a_phases: tuple[np.ndarray, ...] = ()) -> DeviceCost:
        """This roofline in the planners' terms (meshserve.placement.DeviceCost), per token and expert."""
        die = self.die
        return DeviceCost(
            compute_s_per_token=self.flops_per_token / die.peak_flops,
            weight_s_per_expert=self.weight_bytes / die.hbm_bandwidth,
            io_s_per_token=self.act_bytes_per_token / die.hbm_bandwidth,
            fixed_compute_s=2.0 * shared_tokens * self.shared_params / die.peak_flops,
            fixed_memory_s=self.shared_params * self.bytes_per_element / die.hbm_bandwidth,
            a2a_phases=tuple(a2a_phases),
        )

    def device_time(
        self, tokens: np.ndarray, active_experts: np.ndarray, shared_tokens: float = 0.0
    ) -> np.ndarray:
        """Roofline seconds of a device serving ``tokens`` with ``active_experts`` weights read."""
        return self.device_cost(shared_tokens).time(tokens, active_experts)


def expert_cost(
    model: MoEModel, die: Die, weight_bytes: float | None = None, shared_tp: int | None = None
) -> ExpertCost:
    """The model's expert roofline on a die.

    weight_bytes: bytes per routed-expert weight (None = the model's element size; 1 = FP8 weights,
    compute at the same peak: weight-only quantisation). shared_tp: count the shared experts, split
    over this TP degree (None = leave them out).
    """
    element = model.bytes_per_element if weight_bytes is None else weight_bytes
    shared = 0.0 if shared_tp is None else model.shared_experts * model.expert_params / shared_tp
    return ExpertCost(
        flops_per_token=2.0 * model.expert_params,
        weight_bytes=float(model.expert_params * element),
        act_bytes_per_token=2.0 * model.token_bytes,
        die=die,
        shared_params=float(shared),
        bytes_per_element=float(model.bytes_per_element),
    )


def experts_s(
    die: Die,
    model: MoEModel,
    placement: np.ndarray,
    copies: np.ndarray,
    tokens_per_group: float,
    tp: int,
) -> np.ndarray:
    """[N] seconds for each device's routed experts (copies[d] token-expert pairs served), every
    hosted expert's weights read once per step, plus its 1/TP share of the shared experts for its
    group's tokens (ExpertCost, the same roofline as the iteration simulator's)."""
    hosted = (placement > 0).sum(axis=0)
    return expert_cost(model, die, shared_tp=tp).device_time(copies, hosted, shared_tokens=tokens_per_group)
