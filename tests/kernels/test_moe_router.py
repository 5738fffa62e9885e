"""The native MoE router (gate logits, softmax, top-k, renormalisation, counts in one call) equals
SparseMoE.route + bincount, ties between equal probabilities included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.kernels.fused_moe import fused_route
from meshserve.models.layers.moe import SparseMoE

pytestmark = pytest.mark.usefixtures("native_op")


def router(hidden: int, experts: int, k: int, renormalize: bool, weight: torch.Tensor) -> SparseMoE:
    moe = SparseMoE(hidden, 4, experts, k, renormalize=renormalize, weights_in_model_dtype=False)
    moe.gate.weight.data = weight
    return moe.to(weight.dtype)


def check(moe: SparseMoE, x: torch.Tensor) -> None:
    weights, ids, counts = fused_route(x, moe.gate.weight.detach(), moe.top_k, moe.renormalize)
    with torch.inference_mode():
        expected_weights, expected_ids = moe.route(x)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights, atol=0, rtol=2e-6)
    assert torch.equal(counts, torch.bincount(expected_ids.reshape(-1), minlength=moe.num_experts))


@settings(max_examples=40)
@given(
    tokens=st.integers(0, 70),
    hidden=st.sampled_from([1, 16, 62, 130]),
    experts=st.sampled_from([1, 2, 5, 8, 9, 128]),  # 128 with k <= 2: ATen's partial_sort branch
    k=st.integers(1, 4),
    renormalize=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_route_matches_torch_on_exact_logits_with_ties(tokens, hidden, experts, k, renormalize, dtype, seed):
    """Small dyadic values: every summation order gives the same logits, and many of them tie."""
    k = min(k, experts)
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randint(-2, 3, (experts, hidden), generator=gen) / 8).to(dtype)
    x = (torch.randint(-2, 3, (tokens, hidden), generator=gen) / 4).to(dtype)
    check(router(hidden, experts, k, renormalize, weight), x)


def test_route_matches_torch_on_the_race_shape():
    """Random float32 logits: summation order moves them by ulps, far less than any gap between experts."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 512, generator=gen)
    check(router(512, 8, 2, True, torch.randn(8, 512, generator=gen) * 0.05), x)


def test_route_in_bfloat16_rounds_logits_like_the_linear():
    """bfloat16 logits are rounded after a float32 sum whose order differs from F.linear's: a logit near a
    rounding boundary may land one bfloat16 step away, so almost every row (not every row) agrees."""
    gen = torch.Generator().manual_seed(0)
    moe = router(512, 8, 2, True, (torch.randn(8, 512, generator=gen) * 0.05).bfloat16())
    x = torch.randn(300, 512, generator=gen).bfloat16()
    weights, ids, _ = fused_route(x, moe.gate.weight.detach(), 2, True)
    with torch.inference_mode():
        expected_weights, expected_ids = moe.route(x)
    same = (ids == expected_ids).all(dim=1)
    assert same.float().mean() >= 0.98
    torch.testing.assert_close(weights[same], expected_weights[same], atol=0, rtol=1e-2)


def test_bad_top_k_is_refused():
    with pytest.raises(RuntimeError, match="top_k"):
        fused_route(torch.zeros(2, 4), torch.zeros(3, 4), 4, True)
