"""QuantExperts: a MoE layer's stacked experts as two QuantWeights ([E, 2I, H] gate/up, [E, H, I] down), in
place of StackedExperts. SparseMoE runs them through its sort-and-pack path; each batched matmul reads one
stacked QuantWeight."""

from __future__ import annotations

import torch
from torch import nn

from meshserve.kernels.quant_weight import QuantWeight, dequantize
from meshserve.models.layers.quant_linear import QUANT_PARTS

WEIGHTS = ("gate_up", "down")


def expert_matmul(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [E, M, K] times each expert's W [E, N, K] transposed -> [E, M, N] in x's dtype (the torch oracle:
    dequantized per call, until the native quantized MoE op is merged)."""
    return torch.bmm(x.float(), dequantize(w).transpose(1, 2)).to(x.dtype)


class QuantExperts(nn.Module):
    """All experts quantized; ``packed`` is None so SparseMoE takes its torch path through ``matmul``."""

    packed = None
    fused_max_tokens = 0

    def __init__(self, gate_up: QuantWeight, down: QuantWeight) -> None:
        super().__init__()
        self.set_weights(gate_up, down)

    def set_weights(self, gate_up: QuantWeight, down: QuantWeight) -> None:
        for prefix, w in zip(WEIGHTS, (gate_up, down), strict=True):
            setattr(self, f"_{prefix}_form", (w.bits, w.group_size))
            for name in QUANT_PARTS:
                self.register_buffer(f"{prefix}_{name}", getattr(w, name))

    def quant_weight(self, which: int) -> QuantWeight:
        prefix = WEIGHTS[which]
        bits, group = getattr(self, f"_{prefix}_form")
        qweight, scales, zeros, perm = (getattr(self, f"{prefix}_{name}") for name in QUANT_PARTS)
        return QuantWeight(bits, qweight, scales, zeros, group, perm)

    @property
    def nbytes(self) -> int:
        return self.quant_weight(0).nbytes + self.quant_weight(1).nbytes

    def matmul(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """x [E, M, K] times expert weights ``which`` (0: gate_up, 1: down), transposed: [E, M, N]."""
        return expert_matmul(x, self.quant_weight(which))
