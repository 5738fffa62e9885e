"""Decode compute time of one die from a roofline: max(FLOPs / peak, HBM bytes / bandwidth)."""

from __future__ import annotations

import numpy as np

from meshserve.wafer.hardware import Die
from meshserve.wafer.models import MoEModel


def roofline_s(die: Die, flops: np.ndarray | float, hbm_bytes: np.ndarray | float) -> np.ndarray:
    """Seconds for work that is either compute-bound or HBM-bound, whichever is slower."""
    return np.maximum(np.asarray(flops) / die.peak_flops, np.asarray(hbm_bytes) / die.hbm_bandwidth)


def attention_s(die: Die, model: MoEModel, tokens_per_group: float, tp: int, context: int) -> float:
    """One attention block on one TP member: its 1/TP of the heads for all the group's tokens.

    Reads its share of the weights and of the KV cache (GQA: KV heads split over TP, replicated
    when TP exceeds them; MLA: the shared latent cache is read in full by every member).
    """
    kv = tokens_per_group * context * model.kv_bytes_per_token
    kv /= min(tp, model.attention.num_kv_heads) if model.attention.kind == "gqa" else 1
    flops = 2 * tokens_per_group * model.attention_params / tp
    flops += tokens_per_group * context * model.attention_flops_per_context_token / tp
    return float(roofline_s(die, flops, model.attention_params * model.bytes_per_element / tp + kv))


def dense_ffn_s(die: Die, model: MoEModel, tokens_per_group: float, tp: int) -> float:
    """The dense FFN of the first layers, tensor-parallel over the TP group."""
    params = 3 * model.hidden_size * model.dense_intermediate_size / tp
    return float(roofline_s(die, 2 * tokens_per_group * params, params * model.bytes_per_element))


def experts_s(
    die: Die, model: MoEModel, placement: np.ndarray, copies: np.ndarray, tokens_per_group: float, tp: int,
) -> np.ndarray:
    """[N] seconds for each device's routed experts (copies[d] token-expert pairs served) plus its
    1/TP share of the shared experts for its group's tokens. Every hosted expert's weights are read
    once per step."""
    hosted = (placement > 0).sum(axis=0)
    flops = 2 * model.expert_params * copies
    weights = hosted * model.expert_params * model.bytes_per_element
    shared = model.shared_experts * model.expert_params / tp
    flops = flops + 2 * tokens_per_group * shared
    return roofline_s(die, flops, weights + shared * model.bytes_per_element)
