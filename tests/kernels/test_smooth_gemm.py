"""SmoothGEMM: every primitive equals F.linear on the real rows, whatever M, tile or padding rows hold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from meshserve.kernels import bf16_gemm
from meshserve.kernels.bf16_gemm import pack_bf16_pairs, pack_bf16_panels
from meshserve.kernels.profile import GemmTable
from meshserve.kernels.smooth_gemm import (
    KERNELS,
    NATIVE_KERNELS,
    STAGING,
    GemmChoice,
    SmoothLinear,
    pack_weight,
    pad_to_bucket_linear,
    run_bmm,
    run_choice,
)
from meshserve.models import load_model
from meshserve.testing import make_tiny_model

# bfloat16 rounds the output once; the float32 kernels only sum in another order.
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2}}


def weights(n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    b = (torch.randn(n, generator=gen) * 0.05).to(dtype) if bias else None
    return {
        "weight": w,
        "bias": b,
        "packed": pack_weight(w),
        "packed_f32": pack_weight(w.float()),
        "bias_f32": None if b is None else b.float(),
        "pairs": pack_bf16_pairs(w) if dtype == torch.bfloat16 else None,
        "panels": pack_bf16_panels(w) if dtype == torch.bfloat16 else None,
    }


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 200),
    n=st.sampled_from([8, 48, 96]),
    k=st.sampled_from([16, 64, 80]),
    kernel=st.sampled_from(KERNELS),
    tile=st.sampled_from([1, 4, 16, 64]),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_every_primitive_equals_f_linear(m, n, k, kernel, tile, bias, dtype):
    if kernel in NATIVE_KERNELS:  # the native op: bfloat16 weights, any M as is
        tile, dtype = 1, torch.bfloat16
    w = weights(n, k, dtype, bias)
    x = torch.randn(m, k).to(dtype)
    out = run_choice(GemmChoice(kernel, tile), x, **w)
    assert out.shape == (m, n) and out.dtype == dtype
    torch.testing.assert_close(out, F.linear(x, w["weight"], w["bias"]), **TOL[dtype])


@pytest.mark.parametrize("kernel", ["packed", "packed_f32"])
def test_virtual_padding_rows_never_reach_the_real_rows(kernel):
    # Fill the staging buffer with NaN first: padded rows are computed from it but never read back.
    m, k, tile = 37, 64, 16
    w = weights(32, k, torch.bfloat16, bias=True)
    dtype = torch.float32 if kernel == "packed_f32" else torch.bfloat16
    STAGING.get(64, k, dtype).fill_(float("nan"))
    x = torch.randn(m, k).to(torch.bfloat16)
    out = run_choice(GemmChoice(kernel, tile), x, **w)
    assert torch.isfinite(out).all()
    exact = run_choice(GemmChoice(kernel, 1), x, **w)
    assert torch.equal(out, exact)  # same kernel, same rows: the padding changed nothing, bit for bit


def test_smooth_linear_follows_its_table_and_stays_nn_linear_until_prepared():
    torch.manual_seed(0)
    layer = SmoothLinear(64, 96, bias=True).to(torch.bfloat16)
    x = torch.randn(50, 64).to(torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    by_m = [GemmChoice("packed")] * 9 + [GemmChoice("packed_f32", 16)] * 40  # M <= 8 packed, else f32 tiles
    ref = F.linear(x, layer.weight, layer.bias)
    layer.prepare(by_m, budget=1 << 20)  # a budget for the float32 copy: both layouts are kept
    assert layer._packed is not None and layer._packed_f32 is not None and layer.weight.is_meta
    for m in (1, 8, 9, 48, 50):  # 50 is past the table's end: the last entry serves it
        torch.testing.assert_close(layer(x[:m]), ref[:m], **TOL[torch.bfloat16])


@pytest.mark.parametrize("kernel", NATIVE_KERNELS)
def test_native_kernels_serve_bfloat16_layers_and_leave_float32_ones_to_f_linear(kernel):
    torch.manual_seed(0)
    layer = SmoothLinear(64, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(16, 64).to(torch.bfloat16)
    ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())  # exact products, float32 sums
    layer.prepare([GemmChoice(kernel)] * 17)
    assert layer.wants_f32(16) == (kernel == "bf16_fma")  # its tile reads float32 activations
    torch.testing.assert_close(layer(x.float(), out_f32=True), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), ref.bfloat16(), **TOL[torch.bfloat16])
    fp32 = SmoothLinear(64, 40, bias=True)
    fp32.prepare([GemmChoice(kernel)] * 17)
    x32 = torch.randn(16, 64)
    assert not fp32.wants_f32(16) and torch.equal(fp32(x32), F.linear(x32, fp32.weight, fp32.bias))


def test_native_kernels_take_no_tile():
    with pytest.raises(ValueError, match="tile must be 1"):
        GemmChoice("bf16_fma", 16)


def test_pad_to_bucket_baseline_equals_f_linear():
    w = torch.randn(24, 16)
    x = torch.randn(5, 16)
    torch.testing.assert_close(pad_to_bucket_linear(x, w, None, [1, 2, 4, 8]), F.linear(x, w))


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="allowed: linear, packed, packed_f32"):
        GemmChoice("cublas")


@pytest.mark.parametrize("kernel", KERNELS)
def test_expert_bmm_equals_torch_bmm(kernel):
    w = (torch.randn(4, 8, 48) * 0.05).to(torch.bfloat16)  # 4 experts, [N=48, K=8] stored column-major
    w = w.transpose(1, 2)
    x = torch.randn(4, 5, 8).to(torch.bfloat16)
    out = run_bmm(GemmChoice(kernel), x, w, w.float())
    torch.testing.assert_close(out, torch.bmm(x, w.transpose(1, 2)), **TOL[torch.bfloat16])


class NewTensors(TorchDispatchMode):
    """Bytes of every tensor an op allocates (an output sharing no storage with the op's inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _strided(args, kwargs)}
        self.sizes += [
            t.untyped_storage().nbytes()
            for t in _strided(out)
            if t.untyped_storage().data_ptr() not in inputs
        ]
        return out


def _strided(*trees) -> list[torch.Tensor]:
    """The tensors with storage (not meta, not oneDNN's opaque layout) among ``trees``' leaves."""
    leaves = tree_leaves(trees)
    return [t for t in leaves if isinstance(t, torch.Tensor) and not t.is_meta and t.layout == torch.strided]


def test_a_tied_head_packs_over_its_loaded_weight_and_never_holds_two_copies(
    tmp_path, monkeypatch, native_op
):
    # every layer's 64-column panel 8 KiB (hidden and intermediate 64), the head 64 KiB (vocab 512)
    path = make_tiny_model(
        tmp_path / "m", arch="llama", dtype="bfloat16", tie_word_embeddings=True, intermediate_size=64
    )
    lm = load_model(path)
    head = lm.model.lm_head
    loaded, head_bytes = head.weight.data_ptr(), head.weight.nbytes
    ids = torch.tensor([0, 5, 300])
    rows = head.weight[ids].clone()
    monkeypatch.setattr(bf16_gemm, "SCRATCH_BYTES", head_bytes // 8)  # the head in eight runs of panels
    with NewTensors() as new:
        lm.model.prepare_gemms(GemmTable({"bfloat16": {"*": [(1, GemmChoice("brgemm"))]}}), max_tokens=16)
    assert head._panels.data_ptr() == loaded and head.weight.is_meta
    assert new.sizes and max(new.sizes) <= head_bytes // 8  # a scratch, never the head again
    assert torch.equal(lm.model.embed_tokens(ids), rows)  # the embedding reads the packed rows


def test_a_weight_held_elsewhere_is_packed_into_a_new_tensor(native_op):
    layer = SmoothLinear(64, 128, bias=False).to(torch.bfloat16)
    alias = layer.weight.detach()  # a view someone still reads
    before = alias.clone()
    layer.prepare([GemmChoice("brgemm")] * 9)
    assert torch.equal(alias, before) and layer._panels.data_ptr() != alias.data_ptr()


class OneDnnShapes(TorchDispatchMode):
    """The M of every oneDNN linear call (each new one costs a cached primitive for the process's life)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.mkldnn._linear_pointwise.default:
            self.rows.add(args[0].shape[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_exact_m_onednn_choice_sees_a_bounded_set_of_shapes_over_a_serving_run(dtype):
    """A table picking oneDNN at exact M up to 512 made a serving process hold a primitive per M seen
    (benchmarks/soak.py's RSS grew all run): above M = 64 the layer pads to 8 shapes per doubling."""
    torch.manual_seed(0)
    layer = SmoothLinear(64, 40, bias=True).to(dtype)
    ref_layer = {"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone()}
    layer.prepare([GemmChoice("packed_f32" if dtype == torch.bfloat16 else "packed")] * 513, budget=1 << 20)
    x = torch.randn(512, 64).to(dtype)
    seen = OneDnnShapes()
    with seen:
        outs = {m: layer(x[:m]) for m in range(1, 513)}
    assert len(seen.rows) == 64 + 3 * 8 and max(seen.rows) == 512  # exact to 64, then 72, 80, .., 512
    ref = F.linear(x.float(), ref_layer["weight"].float(), ref_layer["bias"].float())
    for m in (64, 65, 100, 129, 300, 512):  # the padded rows never reach the real ones
        torch.testing.assert_close(outs[m].float(), ref[:m], **TOL[dtype])
