"""QuantSlotExperts: the quantized experts one expert-parallel rank holds, as slots, in their packed form.

The counterpart of moe_ep.py's SlotExperts for QuantExperts: each slot is ``PackedQuant.select`` of the
model's packed gate_up and down (no unpacked copy), rows arrive already routed (one slot each, weight 1) and
run through ``quant_moe``. A migration moves a slot as the bytes of its packed tensors: integers, scales,
zeros and act-order permutation have different dtypes, so ``parts`` are uint8 views and sizes are bytes.
"""

from __future__ import annotations

import torch

from meshserve.kernels.quant_gemm import PackedQuant, quant_moe
from meshserve.models.layers.quant_experts import WEIGHTS, PackedExperts, QuantExperts


class QuantSlotExperts(PackedExperts):
    """Slots of packed int8 / int4 experts: gate_up [S, 2I, H] and down [S, H, I]."""

    element_size = 1  # parts are byte views

    def __init__(self, gate_up: PackedQuant, down: PackedQuant) -> None:
        super().__init__()
        for prefix, p in zip(WEIGHTS, (gate_up, down), strict=True):
            self._hold_packed(prefix, p)
        self.hidden_size, self.intermediate_size = gate_up.in_features, down.in_features

    @classmethod
    def held(cls, experts: QuantExperts, index: torch.Tensor) -> QuantSlotExperts:
        """The experts ``index`` of a QuantExperts, copied in their packed form."""
        return cls(*(experts._packed(p).select(index) for p in WEIGHTS))

    def like(self, slots: int) -> QuantSlotExperts:
        """``slots`` uninitialised slots of this layout (a migration fills them through ``parts``)."""

        def empty(p: PackedQuant) -> PackedQuant:
            fill = lambda t: None if t is None else t.new_empty(slots, *t.shape[1:])  # noqa: E731
            return PackedQuant(
                p.bits,
                p.out_features,
                p.in_features,
                p.group_size,
                *(fill(t) for t in (p.qweight, p.scales, p.zeros, p.perm)),
            )

        return QuantSlotExperts(*(empty(self._packed(p)) for p in WEIGHTS))

    def run(self, rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Expert output of each row [R, H] through its slot [R], in the rows' dtype."""
        if len(rows) == 0:
            return rows.new_empty(0, self.hidden_size)
        ones = torch.ones(len(rows), 1, dtype=torch.float32, device=rows.device)
        return quant_moe(rows, slot[:, None], ones, *(self._packed(p) for p in WEIGHTS))

    def _tensors(self) -> list[torch.Tensor]:
        return [t for p in WEIGHTS for t in self._packed(p).tensors()]

    def part_sizes(self) -> list[int]:
        """Bytes of each of one slot's parts (what ``parts`` returns)."""
        return [t[0].numel() * t.element_size() for t in self._tensors()]

    def parts(self, slot: int) -> list[torch.Tensor]:
        """One slot's packed tensors as flat byte views of the slot, not copies: what a migration sends
        and writes."""
        return [t[slot].view(-1).view(torch.uint8) for t in self._tensors()]
