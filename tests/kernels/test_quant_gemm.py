"""Weight-only int8 / int4 kernels: the packed layout, and the ops against their dequantizing oracles."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.kernels.fused_moe import moe_reference
from meshserve.kernels.quant_gemm import (
    PackedQuant,
    pack_quant,
    quant_moe_reference,
    unpack_quant,
)
from meshserve.kernels.quant_weight import QuantWeight, dequantize, pack_int4


def random_quant(
    lead: tuple[int, ...],
    n: int,
    k: int,
    bits: int,
    group_size: int,
    zeros: bool,
    act_order: bool,
    gen: torch.Generator,
) -> QuantWeight:
    """Random integers over the whole range, scales of a typical layer, zero points or symmetric."""
    groups = k // group_size
    if bits == 8:
        q = torch.randint(-128, 128, (*lead, n, k), generator=gen, dtype=torch.int8)
        z = torch.randint(-20, 21, (*lead, n, groups), generator=gen, dtype=torch.int8) if zeros else None
    else:
        q = pack_int4(torch.randint(0, 16, (*lead, n, k), generator=gen, dtype=torch.uint8))
        z = torch.randint(0, 16, (*lead, n, groups), generator=gen, dtype=torch.uint8) if zeros else None
    scales = torch.rand(*lead, n, groups, generator=gen) * 0.02 + 1e-3
    perm = None
    if act_order:
        perm = torch.stack([torch.randperm(k, generator=gen) for _ in range(max(1, len(lead) and lead[0]))])
        perm = perm.reshape(*lead, k)
    return QuantWeight(bits, q, scales, z, group_size, perm)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 50),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([2, 4, 12, 32, 64]),
    bits=st.sampled_from([8, 4]),
    zeros=st.booleans(),
    act_order=st.booleans(),
    experts=st.sampled_from([(), (3,)]),
    seed=st.integers(0, 2**16),
)
def test_pack_round_trips_and_keeps_only_the_packed_bytes(
    n, groups, group_size, bits, zeros, act_order, experts, seed
):
    w = random_quant(
        experts, n, groups * group_size, bits, group_size, zeros, act_order, torch.manual_seed(seed)
    )
    packed = pack_quant(w)
    back = unpack_quant(packed)
    assert torch.equal(dequantize(back), dequantize(w))
    # no float copy: the packed bytes are the QuantWeight's, scaled by the padding of N and of each group
    n_pad = -(-n // 16) * 16
    g_pad = -(-group_size // (4 if bits == 8 else 8)) * (4 if bits == 8 else 8)
    ints = w.qweight.numel() * (n_pad / n) * (g_pad / group_size)
    group_bytes = w.scales.numel() * (n_pad / n) * (4 + (w.zeros is not None))
    perm_bytes = 0 if w.perm is None else w.perm.numel() * 8
    assert packed.nbytes == ints + group_bytes + perm_bytes
    assert [t.dtype for t in packed.tensors()] == [
        t.dtype for t in (w.qweight, w.scales, w.zeros, w.perm) if t is not None
    ]


def test_int4_lane_holds_eight_k_from_the_low_nibble():
    q = torch.arange(16, dtype=torch.uint8).repeat(16, 1)  # row c: k = 0..15 holds value k
    w = QuantWeight(4, pack_int4(q), torch.ones(16, 1), None, 16)
    lane0 = pack_quant(w).qweight[0, 0, :4]  # column 0, k 0..7
    assert lane0.tolist() == [0x10, 0x32, 0x54, 0x76]


def test_select_takes_experts_in_the_packed_form():
    w = random_quant((4,), 20, 64, 4, 32, True, True, torch.manual_seed(0))
    packed = pack_quant(w)
    two = packed.select(torch.tensor([3, 1]))
    assert isinstance(two, PackedQuant) and two.qweight.shape[0] == 2
    assert torch.equal(dequantize(unpack_quant(two)), dequantize(w)[[3, 1]])


def test_expert_reference_is_the_dense_moe_reference_of_the_dequantized_experts():
    gen = torch.manual_seed(1)
    w13 = random_quant((4,), 2 * 24, 64, 4, 32, True, False, gen)
    w2 = random_quant((4,), 64, 24, 8, 24, False, True, gen)
    x = torch.randn(7, 64, generator=gen)
    ids = torch.topk(torch.rand(7, 4, generator=gen), 2, dim=-1).indices
    weights = torch.rand(7, 2, generator=gen)
    ref = moe_reference(x, ids, weights, dequantize(w13), dequantize(w2))
    torch.testing.assert_close(quant_moe_reference(x, ids, weights, w13, w2), ref, atol=1e-4, rtol=1e-5)


def test_a_bad_group_size_is_named():
    with pytest.raises(ValueError, match="group_size"):
        pack_quant(QuantWeight(4, torch.zeros(2, 5, dtype=torch.uint8), torch.ones(2, 3), None, 3))
