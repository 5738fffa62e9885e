"""The native fused MoE op equals its torch oracle, and a prepared SparseMoE equals the unprepared one."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.kernels import native
from meshserve.kernels.fused_moe import (
    fused_moe,
    moe_reference,
    pack_experts,
    pack_experts_in_place,
    use_fused_moe,
)
from meshserve.kernels.smooth_gemm import PLAIN
from meshserve.models.layers.moe import SparseMoE

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True, scope="module")
def native_op():
    if not native.load():
        pytest.fail(f"native kernels missing: run `{native.BUILD_COMMAND}` (make test does)")


def random_routing(tokens: int, experts: int, k: int, busy: int, gen: torch.Generator):
    """Top-k ids drawn from only the first `busy` experts (the rest get no pairs), distinct per token."""
    scores = torch.rand(tokens, experts, generator=gen)
    scores[:, busy:] = -1
    ids = torch.topk(scores, k, dim=-1).indices
    return ids, torch.rand(tokens, k, generator=gen)


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(0, 70),
    hidden=st.sampled_from([2, 16, 62, 64, 130]),
    inter=st.sampled_from([1, 17, 32, 40, 96]),
    experts=st.integers(1, 9),
    k=st.integers(1, 4),
    idle=st.integers(0, 4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_native_matches_reference(tokens, hidden, inter, experts, k, idle, dtype, seed):
    k = min(k, experts)
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids, weights = random_routing(tokens, experts, k, max(k, experts - idle), gen)
    out = fused_moe(x, ids, weights, pack_experts(gate_up, down))
    assert out.dtype == dtype and out.shape == x.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, moe_reference(x, ids, weights, gate_up, down), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    ("tokens", "hidden", "inter", "experts", "k"),
    [(1, 64, 32, 4, 2), (45, 130, 40, 5, 3), (150, 64, 96, 3, 1)],
)
def test_amx_brgemm_path_matches_reference(monkeypatch, tokens, hidden, inter, experts, k):
    """The path an AMX machine takes (oneDNN's brgemm on the same packed weights), forced here; on a CPU
    without AMX oneDNN runs it on AVX-512. Blocks of 32-row calls and a tail; K = hidden and the padded I."""
    import meshserve.kernels.fused_moe as fused_moe_module

    monkeypatch.setattr(fused_moe_module, "brgemm_min_tokens", lambda: 1)
    gen = torch.Generator().manual_seed(tokens)
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).bfloat16()
    down = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).bfloat16()
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    ids, weights = random_routing(tokens, experts, k, experts, gen)
    out = fused_moe(x, ids, weights, pack_experts(gate_up, down))
    tol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(out, moe_reference(x, ids, weights, gate_up, down), atol=tol, rtol=tol)


def test_brgemm_path_is_chosen_by_isa_and_step_size(monkeypatch, switch):
    import meshserve.kernels.fused_moe as fused_moe_module
    from meshserve.kernels import cpu

    amx = frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: amx)
    assert fused_moe_module.brgemm_min_tokens() == 1  # AMX: always
    switch("MESHSERVE_AMX", "off")
    assert 1 < fused_moe_module.brgemm_min_tokens() < sys.maxsize  # as an avx512_bf16 machine
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    assert fused_moe_module.brgemm_min_tokens() == sys.maxsize  # not listed: never
    calls = []
    monkeypatch.setattr(fused_moe_module, "brgemm_min_tokens", lambda: 4)
    monkeypatch.setattr(torch.ops.meshserve, "fused_moe", lambda *args: calls.append(args[-1]) or args[0])
    for tokens, dtype in ((3, torch.bfloat16), (4, torch.bfloat16), (8, torch.float32)):
        packed = pack_experts(torch.zeros(2, 64, 32, dtype=dtype), torch.zeros(2, 32, 32, dtype=dtype))
        ids, weights = torch.zeros(tokens, 1, dtype=torch.long), torch.ones(tokens, 1)
        fused_moe(torch.zeros(tokens, 32, dtype=dtype), ids, weights, packed)
    assert calls == [False, True, False]  # float32 never


def test_packing_accepts_the_loaders_column_major_experts():
    moe = SparseMoE(32, 24, num_experts=4, top_k=2, renormalize=True, weights_in_model_dtype=False)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    gate_up, down = moe.experts.gate_up_proj.detach().clone(), moe.experts.down_proj.detach().clone()
    moe.experts.transposed_layout()
    x = torch.randn(9, 32)
    ids, weights = random_routing(9, 4, 2, 4, torch.Generator().manual_seed(1))
    packed = pack_experts(moe.experts.gate_up_proj.detach(), moe.experts.down_proj.detach())
    expected = moe_reference(x, ids, weights, gate_up, down)
    torch.testing.assert_close(fused_moe(x, ids, weights, packed), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared", [0, 24])
@pytest.mark.parametrize("tokens", [0, 1, 37])
def test_prepared_moe_runs_the_native_op_and_matches_torch_path(dtype, shared, tokens):
    torch.manual_seed(0)
    moe = SparseMoE(
        64,
        48,
        num_experts=6,
        top_k=2,
        renormalize=shared == 0,
        weights_in_model_dtype=shared > 0,
        shared_intermediate_size=shared,
    )
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe = moe.to(dtype)
    reference = copy.deepcopy(moe)
    moe.experts.prepare([PLAIN], [PLAIN])
    assert use_fused_moe(dtype, 64) and moe.experts.packed is not None
    x = torch.randn(tokens, 64).to(dtype)
    with torch.no_grad():
        out, expected = moe(x), reference(x)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, atol=tol * 4, rtol=tol)
    assert torch.equal(moe.last_counts, reference.last_counts)
    assert int(moe.last_counts.sum()) == tokens * 2


def test_steps_over_the_fused_limit_take_the_batched_matmuls(monkeypatch):
    """profiles/moe.json caps the op's step size; a larger step runs the torch path with the same result."""
    from meshserve.models.layers import moe as moe_module

    calls = []
    monkeypatch.setattr(moe_module, "fused_moe", lambda *args: calls.append(len(args[0])) or fused_moe(*args))
    monkeypatch.setattr(moe_module, "fused_max_tokens", lambda dtype: 8)  # as if the profile listed 8
    torch.manual_seed(0)
    moe = SparseMoE(64, 48, num_experts=4, top_k=2, renormalize=True, weights_in_model_dtype=False)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    reference, one_copy = copy.deepcopy(moe), copy.deepcopy(moe)
    moe.experts.prepare([PLAIN], [PLAIN], budget=1 << 20)  # a budget pays for the second copy
    assert not moe.experts.gate_up_proj.is_meta  # the batched matmuls still need the stacked weights
    with torch.no_grad():
        for tokens in (8, 9):
            x = torch.randn(tokens, 64)
            torch.testing.assert_close(moe(x), reference(x), atol=4e-5, rtol=1e-5)
        assert calls == [8]
        one_copy.experts.prepare([PLAIN], [PLAIN])  # no budget: one copy, the op serves every step
        assert one_copy.experts.gate_up_proj.is_meta
        torch.testing.assert_close(one_copy(x), reference(x), atol=4e-5, rtol=1e-5)
        assert calls == [8, 9]


def test_reference_mode_keeps_the_torch_path(switch):
    switch("MESHSERVE_MOE", "reference")
    moe = SparseMoE(16, 8, num_experts=2, top_k=1, renormalize=False, weights_in_model_dtype=False)
    moe.experts.prepare([PLAIN], [PLAIN])
    assert moe.experts.packed is None


def test_bad_expert_id_is_refused():
    packed = pack_experts(torch.zeros(2, 8, 4), torch.zeros(2, 4, 4))
    with pytest.raises(RuntimeError, match="expert id 5"):
        fused_moe(torch.zeros(1, 4), torch.tensor([[5]]), torch.ones(1, 1), packed)


def test_op_registration_and_fake_impl_pass_torch_opcheck():
    packed = pack_experts(torch.randn(3, 64, 32), torch.randn(3, 32, 32))
    ids, weights = random_routing(5, 3, 2, 3, torch.Generator().manual_seed(3))
    torch.library.opcheck(
        torch.ops.meshserve.fused_moe.default,
        (torch.randn(5, 32), ids, weights, *packed),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_prepared_models_run_the_native_op_in_every_moe_layer(tiny_model_dir, monkeypatch, arch):
    """The engine's prepare_gemms packs the experts and every MoE layer calls the op (no silent fallback)."""
    from meshserve.kernels.profile import load_gemm_table
    from meshserve.models import load_model
    from meshserve.models.layers import moe as moe_module
    from meshserve.testing import PagedSequences

    calls = []
    monkeypatch.setattr(moe_module, "fused_moe", lambda *args: calls.append(1) or fused_moe(*args))
    lm = load_model(tiny_model_dir(arch))
    lm.model.prepare_gemms(load_gemm_table(), 64)
    seqs = PagedSequences(lm)
    seqs.step({seqs.add([1, 5, 6, 7]): 4})
    assert len(calls) == lm.config.num_moe_layers
    assert int(lm.model.expert_counts().sum()) == 4 * lm.config.top_k * lm.config.num_moe_layers


def test_bfloat16_step_with_a_busy_and_a_quiet_expert():
    """A busy expert's pairs split into two blocks of whole 8-row tiles and a 1-row tail, a quiet expert's
    5 pairs one short tile, through the shared pair-packed tile (csrc/bf16_dot_tile.h); both match."""
    gen = torch.Generator().manual_seed(7)
    gate_up = (torch.randn(3, 2 * 40, 64, generator=gen) / 8).bfloat16()
    down = (torch.randn(3, 64, 40, generator=gen) / 40**0.5).bfloat16()
    x = torch.randn(150, 64, generator=gen).bfloat16()
    ids = torch.zeros(150, 1, dtype=torch.long)
    ids[:5] = 1  # expert 1: 5 pairs; expert 0: 145 pairs in blocks of 80 and 65; expert 2 idle
    weights = torch.rand(150, 1, generator=gen)
    out = fused_moe(x, ids, weights, pack_experts(gate_up, down))
    torch.testing.assert_close(out, moe_reference(x, ids, weights, gate_up, down), atol=2e-2, rtol=2e-2)


def test_bfloat16_layer_the_op_always_serves_keeps_no_float32_copy():
    """Without a step limit the batched matmuls never run, so their float32 weight copies are not made."""
    from meshserve.kernels.smooth_gemm import GemmChoice

    moe = SparseMoE(64, 48, num_experts=4, top_k=2, renormalize=True, weights_in_model_dtype=False)
    moe = moe.to(torch.bfloat16)
    torch_path = copy.deepcopy(moe)
    f32 = [GemmChoice("packed_f32")]
    moe.experts.prepare(f32, f32)
    assert moe.experts.packed is not None and moe.experts._f32 == (None, None)
    assert moe.experts.gate_up_proj.is_meta and moe.experts.down_proj.is_meta  # the packed copy is the one
    with pytest.raises(RuntimeError, match="kept only packed"):
        moe.experts.prepare(f32, f32, fused=False)
    no_budget = copy.deepcopy(torch_path)
    no_budget.experts.prepare(f32, f32, fused=False)  # a float32 copy is a second copy: none without budget
    assert no_budget.experts._f32 == (None, None)
    torch_path.experts.prepare(f32, f32, fused=False, budget=1 << 20)  # the torch path serves every step
    assert all(w is not None and w.dtype == torch.float32 for w in torch_path.experts._f32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hidden", "inter"), [(64, 32), (64, 48), (96, 64)])
@pytest.mark.parametrize("column_major", [False, True])
def test_packing_in_place_gives_the_same_blocks_over_the_weights_storage(dtype, hidden, inter, column_major):
    """Where an expert's blocks take exactly its bytes they overwrite it (no second copy of the layer);
    elsewhere (padding) they go to a new tensor. Either way the blocks are pack_experts'."""
    torch.manual_seed(0)
    gate_up, down = torch.randn(3, 2 * inter, hidden).to(dtype), torch.randn(3, hidden, inter).to(dtype)
    expected = pack_experts(gate_up, down)
    if column_major:
        gate_up, down = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (gate_up, down))
    pointers = [w.data_ptr() for w in (gate_up, down)]
    packed = pack_experts_in_place(gate_up, down)
    fits = (inter % 32 == 0, inter % 32 == 0 and hidden % 64 == 0)  # I pads to 32; down's H to 64
    for got, want, pointer, fit in zip(packed, expected, pointers, fits, strict=True):
        assert torch.equal(got, want)
        assert (got.data_ptr() == pointer) == fit
