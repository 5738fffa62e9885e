"""An expert-parallel rank's quantized experts: slots in their packed form, and a migration's byte copies."""

from __future__ import annotations

import pytest
import torch

from meshserve.kernels.quant_gemm import quant_moe_reference
from meshserve.kernels.quant_weight import QuantWeight
from meshserve.models.layers.quant_experts import QuantExperts
from meshserve.models.layers.quant_slots import QuantSlotExperts
from tests.kernels.test_quant_gemm import random_quant


def pick(w: QuantWeight, index: torch.Tensor) -> QuantWeight:
    sel = lambda t: None if t is None else t[index]  # noqa: E731
    return QuantWeight(w.bits, w.qweight[index], w.scales[index], sel(w.zeros), w.group_size, sel(w.perm))


@pytest.mark.parametrize(("bits", "act_order"), [(8, False), (4, True)])
def test_slots_hold_and_migrate_the_packed_experts_as_bytes(bits, act_order):
    gen = torch.manual_seed(0)
    gate_up = random_quant((6,), 96, 64, bits, 32, True, act_order, gen)  # 6 experts, H 64, I 48
    down = random_quant((6,), 64, 48, bits, 16, True, act_order, gen)
    held = torch.tensor([4, 1, 3])
    slots = QuantSlotExperts.held(QuantExperts(gate_up, down), held)
    x, slot = torch.randn(10, 64, generator=gen), torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1])
    ones = torch.ones(10, 1)
    expected = quant_moe_reference(x, slot[:, None], ones, pick(gate_up, held), pick(down, held))
    torch.testing.assert_close(slots.run(x, slot), expected, atol=1e-3, rtol=1e-3)
    assert slots.run(x[:0], slot[:0]).shape == (0, 64)  # a rank with no rows this step
    moved = slots.like(3)
    sizes = slots.part_sizes()
    assert [p.numel() for p in moved.parts(0)] == moved.part_sizes() == sizes
    assert all(p.dtype == torch.uint8 for p in slots.parts(1))  # int8/uint8, float32 and int64 parts as bytes
    packed_bytes = sum(b.numel() * b.element_size() for _, b in slots.named_buffers())
    assert 3 * sum(sizes) == packed_bytes  # a slot is its packed bytes, nothing unpacked
    for s in range(3):  # what Migration does, chunk by chunk, into views of the new slots
        for dst, src in zip(moved.parts(2 - s), slots.parts(s), strict=True):
            dst[: len(dst) // 2].copy_(src[: len(src) // 2])
            dst[len(dst) // 2 :].copy_(src[len(src) // 2 :])
    torch.testing.assert_close(moved.run(x, 2 - slot), expected, atol=1e-3, rtol=1e-3)
