"""QuantExperts: a MoE layer's routed experts weight-only int8 / int4, in place of StackedExperts: gate/up
[E, 2I, H] and down [E, H, I], held packed (kernels/quant_gemm.py) and run by ``quant_moe``: each token's
rows go through its top-k experts and are summed by their routing weights in one native call."""

from __future__ import annotations

import torch
from torch import nn

from meshserve.kernels.quant_gemm import quant_moe, unpack_quant
from meshserve.kernels.quant_weight import QuantWeight
from meshserve.models.layers.quant_linear import PackedBuffers

WEIGHTS = ("gate_up_", "down_")


class PackedExperts(PackedBuffers):
    """Stacked experts held packed as gate_up / down (QuantExperts, and an expert-parallel rank's slots):
    what their bytes are, counted off the packed forms."""

    @property
    def num_experts(self) -> int:
        return self.gate_up_qweight.shape[0]

    @property
    def num_weights(self) -> int:
        """Expert weights held (experts x out x in, gate_up and down), read off the packed forms."""
        return self.num_experts * sum(p.out_features * p.in_features for p in map(self._packed, WEIGHTS))

    @property
    def nbytes(self) -> int:
        return sum(self._packed(p).nbytes for p in WEIGHTS)

    def bytes_per_weight(self) -> float:
        """Resident bytes per expert weight, scales and zeros included (what a migration or a read moves)."""
        return self.nbytes / self.num_weights


def expert_weight_bytes(model: nn.Module) -> float | None:
    """Bytes per routed-expert weight of a model whose experts are quantized (None when they are not, or
    when it holds none): what an expert trace records for the simulator to charge."""
    held = (m for m in model.modules() if isinstance(m, PackedExperts) and m.num_experts)
    first = next(held, None)
    return None if first is None else first.bytes_per_weight()


class QuantExperts(PackedExperts):
    """All experts quantized; SparseMoE routes, then calls ``moe``."""

    quantized = True
    packed = None  # not the fused bf16 op's packed copy: SparseMoE's fused test reads it
    fused_max_tokens = 0

    def __init__(self, gate_up: QuantWeight, down: QuantWeight) -> None:
        super().__init__()
        self.set_weights(gate_up, down)

    def set_weights(self, gate_up: QuantWeight, down: QuantWeight) -> None:
        for prefix, w in zip(WEIGHTS, (gate_up, down), strict=True):
            self._hold(prefix, w)

    def quant_weight(self, which: int) -> QuantWeight:
        """Weights ``which`` (0: gate_up, 1: down) as a QuantWeight (unpacked: tests and inspection)."""
        return unpack_quant(self._packed(WEIGHTS[which]))

    def moe(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_j weights[t, j] * expert_{experts[t, j]}(x[t]) for x [T, H], in x's dtype."""
        return quant_moe(x, experts, weights, *(self._packed(p) for p in WEIGHTS))
