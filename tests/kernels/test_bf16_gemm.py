"""The native bfloat16-weight linear equals F.linear in float32 of the same bfloat16 values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.kernels import bf16_gemm, native
from meshserve.kernels.bf16_gemm import (
    bf16_linear,
    bf16_linear_reference,
    brgemm_linear,
    pack_bf16_pairs,
    pack_bf16_panels,
)

pytestmark = pytest.mark.usefixtures("native_op")  # tests/kernels/conftest.py: fails loudly when not built


def test_native_op_is_built_and_loaded():
    assert native.load() and hasattr(torch.ops.meshserve, "bf16_linear")


def random_linear(m: int, k: int, n: int, bias: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    x = torch.randn(m, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    return x, w, b


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 150),
    k=st.integers(1, 300),
    n=st.integers(1, 120),
    bias=st.booleans(),
    out_f32=st.booleans(),
    dpbf16=st.booleans(),
    x_f32=st.booleans(),
    strided=st.booleans(),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_equals_float32_linear(m, k, n, bias, out_f32, dpbf16, x_f32, strided, threads, seed):
    x, w, b = random_linear(m, k, n, bias, seed)
    if strided:  # rows further apart than K (a column slice of a wider activation)
        x = torch.cat((x, x[:, :3]), dim=1)[:, :k]
    ref = bf16_linear_reference(x, w, b, out_f32=True)
    torch.set_num_threads(threads)
    try:
        y = bf16_linear(x.float() if x_f32 else x, pack_bf16_pairs(w), n, b, out_f32, dpbf16)
    finally:
        torch.set_num_threads(2)
    assert y.dtype == (torch.float32 if out_f32 else torch.bfloat16) and y.shape == (m, n)
    if out_f32:  # only the float32 summation order differs
        torch.testing.assert_close(y, ref, atol=2e-5 * k**0.5, rtol=1e-5)
    else:  # ...so a sum on a rounding boundary may round one bfloat16 step the other way
        torch.testing.assert_close(y.float(), ref.bfloat16().float(), atol=1e-3, rtol=2**-7)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(0, 80),
    k=st.integers(1, 200),
    n=st.integers(1, 150),
    bias=st.booleans(),
    out_f32=st.booleans(),
    x_f32=st.booleans(),
    strided=st.booleans(),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_brgemm_equals_float32_linear(m, k, n, bias, out_f32, x_f32, strided, threads, seed):
    """oneDNN's micro-kernel (AMX tiles on AMX machines; its AVX-512 path on this machine kind): row blocks
    of 32 and a tail, 64-column panels and a partial one, odd K."""
    x, w, b = random_linear(m, k, n, bias, seed)
    if strided:
        x = torch.cat((x, x[:, :3]), dim=1)[:, :k]
    ref = bf16_linear_reference(x, w, b, out_f32=True)
    torch.set_num_threads(threads)
    try:
        y = brgemm_linear(x.float() if x_f32 else x, pack_bf16_panels(w), n, b, out_f32)
    finally:
        torch.set_num_threads(2)
    assert y.dtype == (torch.float32 if out_f32 else torch.bfloat16) and y.shape == (m, n)
    if out_f32:
        torch.testing.assert_close(y, ref, atol=2e-5 * k**0.5, rtol=1e-5)
    else:
        torch.testing.assert_close(y.float(), ref.bfloat16().float(), atol=1e-3, rtol=2**-7)


def test_brgemm_splits_long_k_into_accumulated_chunks():
    """K = 4099: chunks of 2048, 2048 and the 4-wide tail (the odd element's zero partner), added up."""
    x, w, b = random_linear(35, 4099, 70, True, 1)
    y = brgemm_linear(x, pack_bf16_panels(w), 70, b, out_f32=True)
    ref = bf16_linear_reference(x, w, b, out_f32=True)
    torch.testing.assert_close(y, ref, atol=2e-5 * 4099**0.5, rtol=1e-5)


def test_brgemm_refuses_a_weight_packed_for_another_shape():
    x, w, _ = random_linear(3, 64, 70, False, 0)
    with pytest.raises(RuntimeError, match="pack_bf16_panels"):
        brgemm_linear(x, pack_bf16_pairs(w), 70)
    torch.library.opcheck(
        torch.ops.meshserve.brgemm_linear.default,
        (x, pack_bf16_panels(w), 70, None, False),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_odd_k_tail_uses_the_real_element_only():
    """K = 2j + 1: the last activation's partner lies past the row; a NaN there must not leak in."""
    x, w, _ = random_linear(9, 7, 40, False, 0)
    wide = torch.cat((x, torch.full((9, 1), float("nan"), dtype=torch.bfloat16)), dim=1)
    for dpbf16 in (False, True):
        for xin in (wide[:, :7], wide.float()[:, :7]):
            y = bf16_linear(xin, pack_bf16_pairs(w), 40, None, True, dpbf16)
            torch.testing.assert_close(y, bf16_linear_reference(x, w, out_f32=True), atol=1e-5, rtol=1e-5)


def test_pack_layout_pairs_k_per_column():
    w = torch.arange(3 * 5, dtype=torch.float32).reshape(3, 5).bfloat16()  # N=3, K=5
    p = pack_bf16_pairs(w)
    assert p.shape == (1, 3, 32)
    assert p[0, 1, :6].tolist() == [2.0, 3.0, 7.0, 8.0, 12.0, 13.0]  # pair k=2,3 of columns 0, 1, 2
    assert p[0, 2, :6].tolist() == [4.0, 0.0, 9.0, 0.0, 14.0, 0.0]  # odd-K tail pairs with zero
    assert p[0, :, 6:].abs().sum() == 0  # padded columns


@pytest.mark.parametrize("pack", [pack_bf16_pairs, pack_bf16_panels])
def test_packing_in_place_takes_the_weights_storage_and_equals_a_copy(pack, monkeypatch):
    monkeypatch.setattr(bf16_gemm, "SCRATCH_BYTES", 3 * 64 * 96 * 2)  # 3 panels / 12 pair blocks per run
    w = (torch.randn(320, 96) * 0.05).to(torch.bfloat16)
    expected = pack(w)
    packed = pack(w, in_place=True)
    assert packed.data_ptr() == w.data_ptr() and torch.equal(packed, expected)
    odd = torch.randn(70, 96).to(torch.bfloat16)  # padding needed: a new tensor, the weight untouched
    before = odd.clone()
    assert torch.equal(pack(odd, in_place=True), pack(before)) and torch.equal(odd, before)


def test_mismatched_packed_weight_is_rejected():
    x, w, _ = random_linear(4, 64, 32, False, 0)
    with pytest.raises(RuntimeError, match="packed weight does not match"):
        bf16_linear(x, pack_bf16_pairs(w), 48)
    with pytest.raises(RuntimeError, match="packed weight does not match"):
        bf16_linear(x[:, :62], pack_bf16_pairs(w), 32)


def test_op_passes_opcheck():
    x, w, b = random_linear(5, 33, 20, True, 1)
    packed = pack_bf16_pairs(w)
    for args in ((x, packed, 20, b, False, False), (x.float(), packed, 20, None, True, True)):
        torch.library.opcheck(torch.ops.meshserve.bf16_linear.default, args)
