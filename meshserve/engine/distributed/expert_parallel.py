"""A loaded model's MoE layers made expert-parallel on one rank, plus the step-boundary placement switch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from meshserve.engine.distributed.expert_map import ExpertMap
from meshserve.models.layers.moe import SparseMoE
from meshserve.models.layers.moe_ep import ExpertParallelMoE, SlotExperts
from meshserve.models.layers.quant_slots import QuantSlotExperts


class ExpertParallel:
    """Wraps every SparseMoE of ``model`` in an ExpertParallelMoE holding this rank's experts of ``holds``;
    ``dispatch`` is ParallelConfig.ep_dispatch (even | balanced)."""

    def __init__(
        self,
        model: nn.Module,
        holds: np.ndarray,
        rank: int,
        group: dist.ProcessGroup | None = None,
        dispatch: str = "even",
    ) -> None:
        self.rank, self.dispatch = rank, dispatch
        self._dtype, self.device = next(model.parameters()).dtype, next(model.parameters()).device
        self.map = ExpertMap(holds, self.device)
        self.layers: list[ExpertParallelMoE] = []
        for block in model.layers:
            if isinstance(block.mlp, SparseMoE):
                i = len(self.layers)
                held = self.map.local_experts(i, rank)
                block.mlp = ExpertParallelMoE(block.mlp, i, self.map, held, rank, group, dispatch)
                self.layers.append(block.mlp)

    @property
    def holds(self) -> np.ndarray:
        return self.map.holds

    @torch.inference_mode()
    def idle(self) -> None:
        """Join every MoE layer's all-to-alls with no tokens (this rank had no work this step)."""
        for layer in self.layers:
            layer(torch.zeros(0, layer.hidden_size, dtype=self._dtype, device=self.device))

    def counts(self) -> np.ndarray:
        """Tokens this rank routed to each expert in the last step, [moe_layers, experts]."""
        return torch.stack([layer.moe.last_counts for layer in self.layers]).cpu().numpy()

    def received(self) -> list[int]:
        """Token-expert pairs this rank's experts computed in the last step, per MoE layer."""
        return [layer.last_received for layer in self.layers]

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (what a migration copies per replica)."""
        return sum(part.nbytes for part in self.parts(0, int(self.map.local_experts(0, self.rank)[0])))

    def parts(self, layer: int, expert: int) -> list[torch.Tensor]:
        """This rank's copy of one expert as flat views (SlotExperts.parts; it must hold the expert)."""
        slot = int(self.map.slot_of[layer, expert, self.rank])
        assert slot >= 0, f"rank {self.rank} holds no expert {expert} in MoE layer {layer}"
        return self.layers[layer].local.parts(slot)

    def allocate(self, holds: np.ndarray) -> Prepared:
        """Empty expert slots for placement ``holds`` on this rank, to be filled in place (see migration.py)
        while the current ones keep serving."""
        new = ExpertMap(holds, self.device)
        local = [
            layer.local.like(len(new.local_experts(i, self.rank))) for i, layer in enumerate(self.layers)
        ]
        return Prepared(new, local)

    def install(self, prepared: Prepared) -> None:
        """Serve the prepared placement from the next forward on (called at a step boundary)."""
        for layer, local in zip(self.layers, prepared.local, strict=True):
            layer.placement, layer.local = prepared.map, local
        self.map = prepared.map


@dataclass
class Prepared:
    """A placement ready to install: its lookup tables and this rank's experts per MoE layer."""

    map: ExpertMap
    local: list[SlotExperts | QuantSlotExperts]

    def parts(self, layer: int, expert: int, rank: int) -> list[torch.Tensor]:
        """Where expert ``expert`` of MoE layer ``layer`` goes on ``rank`` (this rank), as flat views."""
        return self.local[layer].parts(int(self.map.slot_of[layer, expert, rank]))
