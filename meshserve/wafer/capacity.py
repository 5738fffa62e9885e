"""Does a point fit? HBM per die = weights + expert replicas + KV cache at a stated context.

Per die: its routed-expert slots (originals and replicas) in every MoE layer; its 1/TP of the
attention, dense-FFN and shared-expert weights; and its KV cache: a TP group decodes
``tp * tokens_per_device`` sequences of ``context`` tokens, GQA splits their KV heads over TP
(replicated when TP exceeds them), MLA's latent cache has no heads to split, so every TP member
holds all of it. Embeddings and the LM head are left out (no vocabulary in the presets), so a
point marked infeasible is infeasible; one marked feasible may still be tight.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.errors import InputError
from meshserve.wafer.hardware import Hardware
from meshserve.wafer.models import MoEModel


@dataclass(frozen=True)
class Fit:
    """Bytes one die needs, by part, against its HBM capacity."""

    experts: float
    dense_weights: float  # attention, dense FFN and shared experts: each die's 1/TP
    kv_cache: float
    capacity: float
    context: int

    @property
    def need(self) -> float:
        return self.experts + self.dense_weights + self.kv_cache

    @property
    def fits(self) -> bool:
        return self.need <= self.capacity

    def describe(self) -> str:
        """The numbers, for a table note or an error."""
        gb = 1e9
        return (
            f"needs {self.need / gb:.1f} GB per die (experts {self.experts / gb:.1f} + weights "
            f"{self.dense_weights / gb:.1f} + KV {self.kv_cache / gb:.1f} at {self.context} tokens of "
            f"context) of {self.capacity / gb:.0f} GB HBM"
        )

    def summary(self) -> dict:
        return {
            "fits_memory": self.fits,
            "memory_need_gb": self.need / 1e9,
            "memory_capacity_gb": self.capacity / 1e9,
            "kv_cache_gb": self.kv_cache / 1e9,
        }


def die_memory(
    model: MoEModel,
    hw: Hardware,
    tp: int,
    slots_per_device: int,
    tokens_per_device: int,
    context: int,
    expert_weight_bytes: float | None = None,
) -> Fit:
    """HBM one die needs for this point (see the module docstring)."""
    element = model.bytes_per_element if expert_weight_bytes is None else expert_weight_bytes
    experts = slots_per_device * model.num_moe_layers * model.expert_params * element
    dense = model.attention_params * model.num_layers
    dense += 3 * model.hidden_size * model.dense_intermediate_size * model.first_dense_layers
    dense += model.shared_experts * model.expert_params * model.num_moe_layers
    kv = tp * tokens_per_device * context * model.kv_bytes_per_token * model.num_layers / model.kv_shards(tp)
    return Fit(
        experts=float(experts),
        dense_weights=float(dense * model.bytes_per_element / tp),
        kv_cache=float(kv),
        capacity=float(hw.die.hbm_bytes),
        context=context,
    )


def require_fit(fit: Fit, where: str) -> None:
    """Refuse a single point that does not fit, naming the numbers."""
    if not fit.fits:
        raise InputError(
            "tokens_per_device",
            f"{where} does not fit in memory: {fit.describe()}; lower tokens_per_device or "
            "context_tokens, or turn costs.check_capacity off to simulate it anyway",
        )


def fits(*rows: dict) -> bool:
    """Whether every run summary of a table cell fits (a run without the check counts as fitting)."""
    return all(r.get("fits_memory", True) for r in rows)


NO_FIT = " (no fit)"  # the mark tables put beside a figure whose point exceeds a die's HBM
