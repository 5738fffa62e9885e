"""Weight-only int8 / int4 kernels: the packed layout, and the ops against their dequantizing oracles."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.kernels.cpu import X86_TAGS
from meshserve.kernels.fused_moe import moe_reference
from meshserve.kernels.quant_gemm import (
    PATHS,
    PackedQuant,
    brgemm_min_rows,
    dequantize_rows,
    native_ready,
    pack_quant,
    quant_linear,
    quant_moe,
    quant_moe_reference,
    unpack_quant,
)
from meshserve.kernels.quant_weight import (
    QuantWeight,
    dequantize,
    pack_int4,
    quant_linear_reference,
    unpack_int4,
)


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
    if act_order:  # one permutation per expert
        perm = torch.stack([torch.randperm(k, generator=gen) for _ in range(lead[0] if lead else 1)])
        perm = perm.reshape(*lead, k)
    return QuantWeight(bits, q, scales, z, group_size, perm)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 50),
    groups=st.integers(1, 3),
    group_size=st.sampled_from([2, 12, 32, 64]),
    bits=st.sampled_from([8, 4]),
    zeros=st.booleans(),
    act_order=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dequantize_rows_reads_the_rows_of_the_packed_weight(
    n, groups, group_size, bits, zeros, act_order, seed
):
    """The tied embedding's lookup: rows of W, in the checkpoint's column order, from the packed layout."""
    gen = torch.manual_seed(seed)
    w = random_quant((), n, groups * group_size, bits, group_size, zeros, act_order, gen)
    rows = torch.randint(0, n, (7,), generator=gen)
    assert torch.equal(dequantize_rows(pack_quant(w), rows), dequantize(w)[rows])


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
    # no float copy: the packed bytes are the QuantWeight's, with N padded to 16 and each group to a unit
    unit = 4 if bits == 8 else 8
    n_pad, g_pad, experts_count = -(-n // 16) * 16, -(-group_size // unit) * unit, max(1, sum(experts))
    ints = experts_count * n_pad * groups * g_pad * bits // 8
    group_bytes = experts_count * n_pad * groups * (4 + (w.zeros is not None))
    perm_bytes = 0 if w.perm is None else w.perm.numel() * 8
    assert packed.nbytes == ints + group_bytes + perm_bytes
    assert [t.dtype for t in packed.tensors()] == [
        t.dtype for t in (w.qweight, w.scales, w.zeros, w.perm) if t is not None
    ]


def test_int4_lane_holds_even_k_in_its_low_half_and_odd_k_in_its_high_half():
    q = torch.arange(16, dtype=torch.uint8).repeat(16, 1)  # row c: k = 0..15 holds value k
    w = QuantWeight(4, pack_int4(q), torch.ones(16, 1), None, 16)
    lane0 = pack_quant(w).qweight[0, 0, :4]  # column 0, k 0..7: nibbles from the low one hold 0 2 4 6 1 3 5 7
    assert lane0.tolist() == [0x20, 0x64, 0x31, 0x75]
    # so the 32-bit lane shifted right by 4p holds k 2p and 2p + 1 in the low nibbles of its two halves
    word = int.from_bytes(bytes(lane0.tolist()), "little")
    assert [((word >> 4 * p) & 0xF, (word >> (16 + 4 * p)) & 0xF) for p in range(4)] == [
        (0, 1),
        (2, 3),
        (4, 5),
        (6, 7),
    ]


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


# ---- the native ops (tests/kernels/conftest.py's native_op fixture fails loudly when they are not built)


@pytest.fixture
def native_quant(native_op) -> None:
    if not native_ready():
        pytest.fail("the native build has no quant_linear / quant_moe: rebuild the native kernels")


# The decode tiles sum (q + offset) * x and subtract (offset + z) * sum(x) (csrc/quant_tile.h kLaneOffset).
LANE_OFFSET = {8: 384, 4: 16}


def magnitude(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """|x| @ ((|q| + |z| + 2 offset) * s).T: what bounds the float32 rounding of the kernels' sums, whose
    zero term s * (offset + z) * sum(x) is added apart from s * sum((q + offset) * x)."""
    q = (unpack_int4(w.qweight) if w.bits == 4 else w.qweight).float().abs()
    z = (w.zeros.float() if w.zeros is not None else torch.full_like(w.scales, 8 if w.bits == 4 else 0)).abs()
    per_col = lambda t: t.repeat_interleave(w.group_size, dim=-1)  # noqa: E731
    dense = (q + per_col(z) + 2 * LANE_OFFSET[w.bits]) * per_col(w.scales)
    xs = x.float().abs() if w.perm is None else x.float().abs()[:, w.perm]
    return xs @ dense.T


def assert_float32_close(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    """Equal up to float32 summation order; bfloat16 results also up to one rounding of the sum."""
    err = (y.float() - ref.float()).abs()
    limit = 1e-5 * bound + 1e-30
    if y.dtype == torch.bfloat16:
        limit = limit + ref.float().abs() * 2**-8
    worst = (err - limit).max().item() if err.numel() else 0.0
    assert worst <= 0, f"off by {err.max().item():.3g} (bound {bound.max().item():.3g})"


@pytest.mark.usefixtures("native_quant")
@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(0, 40),
    n=st.integers(1, 70),
    group_size=st.sampled_from([32, 64, 128, None]),  # None: one group of K (per-channel)
    groups=st.integers(1, 4),
    k_alone=st.integers(1, 150),  # K when one group spans it (x2: int4 packs pairs)
    bits=st.sampled_from([8, 4]),
    zeros=st.booleans(),
    act_order=st.booleans(),
    x_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    bias=st.booleans(),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_linear_equals_the_dequantized_reference(
    m, n, group_size, groups, k_alone, bits, zeros, act_order, x_dtype, bias, threads, seed
):
    gen = torch.Generator().manual_seed(seed)
    k = groups * group_size if group_size else 2 * k_alone
    w = random_quant((), n, k, bits, group_size or k, zeros, act_order, gen)
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    b = torch.randn(n, generator=gen) if bias else None
    torch.set_num_threads(threads)
    try:
        y = quant_linear(x, pack_quant(w), b)
    finally:
        torch.set_num_threads(2)
    assert y.dtype == x_dtype and y.shape == (m, n)
    ref = quant_linear_reference(x.float(), w, b)
    bound = magnitude(x, w) + (0 if b is None else b.abs())
    assert_float32_close(y, ref, bound)


@pytest.mark.usefixtures("native_quant")
@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 300),
    n=st.integers(1, 140),
    group_size=st.sampled_from([32, 128, None]),
    groups=st.integers(1, 12),
    k_alone=st.integers(1, 700),
    bits=st.sampled_from([8, 4]),
    zeros=st.booleans(),
    act_order=st.booleans(),
    bias=st.booleans(),
    brgemm_rows=st.sampled_from([0, 33]),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_prefill_brgemm_path_equals_the_dequantized_reference(
    m, n, group_size, groups, k_alone, bits, zeros, act_order, bias, brgemm_rows, threads, seed
):
    """bfloat16 rows from brgemm_rows on: the weight dequantized a K block (512) at a time into a bfloat16
    scratch for oneDNN's brgemm (csrc/quant_brgemm.h): K past one block, groups across blocks, calls of 32
    rows and tasks of up to 256 rows, tails of each."""
    gen = torch.Generator().manual_seed(seed)
    k = groups * group_size if group_size else 2 * k_alone
    w = random_quant((), n, k, bits, group_size or k, zeros, act_order, gen)
    x = torch.randn(m, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen) if bias else None
    torch.set_num_threads(threads)
    try:
        y = quant_linear(x, pack_quant(w), b, brgemm_rows=brgemm_rows)
    finally:
        torch.set_num_threads(2)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    ref = quant_linear_reference(x.float(), w, b)
    assert_float32_close(y, ref, magnitude(x, w) + (0 if b is None else b.abs()))


def test_the_prefill_path_is_chosen_by_isa_tag_not_cpu_name():
    table = json.loads(PATHS.read_text())["brgemm_min_rows"]
    assert set(table) <= set(X86_TAGS)  # capability tags (kernels/cpu.py), never a CPU's name
    assert all(rows >= 1 for rows in table.values())
    assert "avx2" not in table  # no bfloat16 dot products: oneDNN's brgemm has no fast bfloat16 path there
    assert brgemm_min_rows() in (*table.values(), sys.maxsize)


@pytest.mark.usefixtures("native_quant")
def test_a_negative_brgemm_rows_is_named():
    p = pack_quant(random_quant((), 16, 64, 8, 64, False, False, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="brgemm_rows"):
        quant_linear(torch.randn(2, 64).bfloat16(), p, brgemm_rows=-1)


@pytest.mark.usefixtures("native_quant")
def test_linear_reads_strided_rows_and_ignores_what_lies_past_k():
    """A column slice of a wider activation; a NaN just past K must not leak into the sums."""
    gen = torch.Generator().manual_seed(4)
    w = random_quant((), 33, 96, 4, 32, True, True, gen)
    wide = torch.randn(5, 97, generator=gen)
    wide[:, 96] = float("nan")
    y = quant_linear(wide[:, :96], pack_quant(w))
    assert_float32_close(y, quant_linear_reference(wide[:, :96], w), magnitude(wide[:, :96], w))
    # the brgemm path reads bfloat16 rows in place when they need no act-order or padding
    w = random_quant((), 33, 96, 4, 32, True, False, gen)
    wide = torch.randn(40, 97, generator=gen).bfloat16()
    wide[:, 96] = float("nan")
    y = quant_linear(wide[:, :96], pack_quant(w), brgemm_rows=0)
    assert_float32_close(y, quant_linear_reference(wide[:, :96].float(), w), magnitude(wide[:, :96], w))


@pytest.mark.usefixtures("native_quant")
@settings(max_examples=30, deadline=None)
@given(
    tokens=st.integers(0, 60),
    hidden=st.sampled_from([32, 64, 96]),
    inter=st.sampled_from([8, 24, 64]),
    experts=st.integers(1, 6),
    k=st.integers(1, 3),
    bits=st.sampled_from([8, 4]),
    group_size=st.sampled_from([8, 32, None]),
    zeros=st.booleans(),
    act_order=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    brgemm_rows=st.sampled_from([None, 0, 40]),  # this CPU's choice, or the brgemm path forced
    seed=st.integers(0, 2**16),
)
def test_experts_equal_their_reference(
    tokens, hidden, inter, experts, k, bits, group_size, zeros, act_order, dtype, brgemm_rows, seed
):
    k = min(k, experts)
    gen = torch.Generator().manual_seed(seed)
    gs = group_size if group_size and hidden % group_size == 0 and inter % group_size == 0 else None
    w13 = random_quant((experts,), 2 * inter, hidden, bits, gs or hidden, zeros, act_order, gen)
    w2 = random_quant((experts,), hidden, inter, bits, gs or inter, zeros, act_order, gen)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids = torch.rand(tokens, experts, generator=gen).topk(k, dim=-1).indices
    weights = torch.rand(tokens, k, generator=gen)
    out = quant_moe(x, ids, weights, pack_quant(w13), pack_quant(w2), brgemm_rows=brgemm_rows)
    assert out.dtype == dtype and out.shape == x.shape
    ref = quant_moe_reference(x, ids, weights, w13, w2).float()
    scale = ref.abs().amax().item() if ref.numel() else 0.0
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: activations rounded between the GEMMs
    torch.testing.assert_close(out.float(), ref, atol=tol * max(scale, 1.0), rtol=tol)


@pytest.mark.usefixtures("native_quant")
def test_mismatched_packed_weight_and_bad_ids_are_named():
    gen = torch.Generator().manual_seed(0)
    p = pack_quant(random_quant((), 20, 64, 4, 32, True, False, gen))
    with pytest.raises(ValueError, match="in_features"):
        quant_linear(torch.randn(2, 32), p)
    with pytest.raises(RuntimeError, match="qweight does not match"):
        torch.ops.meshserve.quant_linear(torch.randn(2, 64), p.qweight, p.scales, p.zeros, None, 4, 32, 40)
    with pytest.raises(RuntimeError, match="scales must be float32"):
        torch.ops.meshserve.quant_linear(torch.randn(2, 64), p.qweight, p.scales, p.zeros, None, 4, 64, 20)
    bad_perm = torch.full((64,), 64, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="perm entries must lie in"):
        torch.ops.meshserve.quant_linear(
            torch.randn(2, 64), p.qweight, p.scales, p.zeros, bad_perm, 4, 32, 20
        )
    w13 = pack_quant(random_quant((2,), 16, 64, 8, 64, False, False, gen))
    w2 = pack_quant(random_quant((2,), 64, 8, 8, 8, False, False, gen))
    with pytest.raises(RuntimeError, match="expert id 2 outside"):
        quant_moe(torch.randn(1, 64), torch.tensor([[2]]), torch.ones(1, 1), w13, w2)


@pytest.mark.usefixtures("native_quant")
def test_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(2)
    p = pack_quant(random_quant((), 20, 64, 4, 32, True, True, gen))
    args = (torch.randn(3, 64), p.qweight, p.scales, p.zeros, p.perm, 4, 32, 20, torch.randn(20))
    torch.library.opcheck(torch.ops.meshserve.quant_linear.default, args)
    torch.library.opcheck(torch.ops.meshserve.quant_linear.default, (args[0].bfloat16(), *args[1:], 0))
    w13 = pack_quant(random_quant((3,), 16, 64, 8, 32, True, False, gen))
    w2 = pack_quant(random_quant((3,), 64, 8, 8, 8, False, True, gen))
    ids = torch.tensor([[0, 2], [1, 0]])
    moe_args = (torch.randn(2, 64), ids, torch.rand(2, 2))
    for w in (w13, w2):
        moe_args += (w.qweight, w.scales, w.zeros, w.perm, w.bits, w.group_size, w.out_features)
    torch.library.opcheck(
        torch.ops.meshserve.quant_moe.default, moe_args, test_utils=("test_schema", "test_faketensor")
    )
