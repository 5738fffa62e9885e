"""DeepSeek's MoE: grouped top-k routing, routed_scaling_factor, and shared experts every token runs.

Routing (DeepSeek-V2/V3, as transformers computes it, in float32 with a float32 gate):
  scores = softmax(logits) or sigmoid(logits)                                  (scoring_func)
  greedy:               top-k of scores
  group_limited_greedy: keep the topk_group groups with the highest max score, then top-k of scores
  noaux_tc:             choice = scores + e_score_correction_bias; keep the topk_group groups with the
                        highest sum of their two best choices; top-k of choice; weights = scores there
  weights /= sum(weights) + 1e-20 when norm_topk_prob; then weights *= routed_scaling_factor.
All of it is a few tensor ops over [T, groups, experts / group]: no loop over tokens or experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.errors import InputError
from meshserve.models.config import ModelConfig, flag, positive, positive_real
from meshserve.models.layers.mlp import GatedMLP
from meshserve.models.layers.moe import SparseMoE

SCORING = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass
class GroupedRouting:
    """The router's settings (config.json names)."""

    scoring_func: str
    topk_method: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float


def read_routing(cfg: ModelConfig, hf: dict[str, Any], scoring: str, method: str, norm: bool) -> None:
    """The router's fields into cfg (defaults: the family's, as transformers' config classes give them)."""
    scoring = hf.get("scoring_func") or scoring
    method = hf.get("topk_method") or method
    if scoring not in SCORING:
        raise InputError(
            "config.json:scoring_func", f"unsupported {scoring!r}; allowed: {', '.join(SCORING)}"
        )
    if method not in TOPK_METHODS:
        raise InputError(
            "config.json:topk_method", f"unsupported {method!r}; allowed: {', '.join(TOPK_METHODS)}"
        )
    grouped = method != "greedy"
    n_group = positive(hf, "n_group", 1) if grouped else 1
    topk_group = positive(hf, "topk_group", 1) if grouped else 1
    if cfg.num_experts % n_group:
        raise InputError(
            "config.json:n_group", f"must divide n_routed_experts={cfg.num_experts}, got {n_group}"
        )
    if topk_group > n_group:
        raise InputError("config.json:topk_group", f"must be at most n_group={n_group}, got {topk_group}")
    if cfg.top_k > topk_group * (cfg.num_experts // n_group):
        raise InputError(
            "config.json:num_experts_per_tok",
            f"must be at most topk_group x experts per group = {topk_group * (cfg.num_experts // n_group)}",
        )
    if method == "noaux_tc" and cfg.num_experts // n_group < 2:
        raise InputError(
            "config.json:n_group", "noaux_tc scores a group by its two best experts: needs >= 2 each"
        )
    cfg.routing = GroupedRouting(
        scoring_func=scoring,
        topk_method=method,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=flag(hf, "norm_topk_prob", norm),
        routed_scaling_factor=positive_real(hf, "routed_scaling_factor", 1.0),
    )


class GroupedRouter(nn.Module):
    """The gate: a float32 [experts, hidden] weight and (noaux_tc) the correction bias.

    Both stay float32 whatever the model's dtype, as transformers keeps them (_keep_in_fp32_modules_strict):
    `_apply` (what Module.to runs) moves them without casting.
    """

    keeps_float32 = True  # the loader builds and fills these parameters in float32

    def __init__(self, hidden_size: int, num_experts: int, routing: GroupedRouting, top_k: int) -> None:
        super().__init__()
        self.routing, self.top_k = routing, top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(num_experts)) if routing.topk_method == "noaux_tc" else None
        )

    def _apply(self, fn: Any, recurse: bool = True) -> GroupedRouter:
        kept = {n: p.data for n, p in self.named_parameters(recurse=False)}
        super()._apply(fn, recurse)
        for name, data in kept.items():  # the device fn chose, the float32 values as they were
            getattr(self, name).data = data.to(getattr(self, name).device)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights [T, k] (float32) and expert ids [T, k] for tokens x [T, H]."""
        r = self.routing
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if r.scoring_func == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if r.topk_method != "greedy":
            grouped = choice.view(x.shape[0], r.n_group, choice.shape[1] // r.n_group)  # also for 0 rows
            if r.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1)[0].sum(-1)
            else:
                group_scores = grouped.max(-1).values
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(r.topk_group, dim=-1, sorted=False)[1], True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        experts = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, experts)
        if r.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * r.routed_scaling_factor, experts


class GroupedMoE(SparseMoE):
    """DeepSeek's MoE layer: grouped routing over the routed experts, plus ungated shared experts."""

    native_router = False  # the native router does softmax top-k only; the experts still run natively

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.routing is None:
            raise ValueError("GroupedMoE needs cfg.routing (read_routing)")
        super().__init__(
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.num_experts,
            cfg.top_k,
            renormalize=False,
            weights_in_model_dtype=False,  # float32 weights times each expert's output, as transformers
        )
        self.gate = GroupedRouter(cfg.hidden_size, cfg.num_experts, cfg.routing, cfg.top_k)
        width = cfg.shared_expert_intermediate_size
        self.shared_experts = GatedMLP(cfg.hidden_size, width) if width else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(x)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.shared_experts is None else self.shared_experts(x)
