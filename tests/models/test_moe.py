"""The vectorised MoE block equals a per-token loop over chosen experts, and counts what it routes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from meshserve.models import load_model
from meshserve.models.layers.moe import SparseMoE
from meshserve.testing import PagedSequences


def naive_moe(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    weights, experts = moe.route(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], experts[t], strict=True):
            gate, up = (moe.experts.gate_up_proj[e] @ x[t]).chunk(2)
            out[t] += w * (moe.experts.down_proj[e] @ (F.silu(gate) * up))
    if moe.shared_expert is not None:
        out += torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)
    return out


@pytest.mark.parametrize("tokens", [0, 1, 3, 40])
@pytest.mark.parametrize("shared", [0, 24])
def test_moe_matches_naive_loop(tokens, shared):
    torch.manual_seed(0)
    moe = SparseMoE(16, 32, num_experts=6, top_k=2, renormalize=shared == 0, weights_in_model_dtype=True,
                    shared_intermediate_size=shared)  # fmt: skip
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(tokens, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), naive_moe(moe, x), atol=1e-5, rtol=1e-5)
        _, experts = moe.route(x)
    assert moe.last_counts.tolist() == torch.bincount(experts.flatten(), minlength=6).tolist()


def test_expert_counts_per_moe_layer(tiny_model_dir):
    lm = load_model(tiny_model_dir("qwen2_moe", num_hidden_layers=3, decoder_sparse_step=2))
    assert lm.config.num_moe_layers == 1 and lm.config.moe_layers == [1]
    seqs = PagedSequences(lm)
    seq = seqs.add(list(range(1, 12)))
    seqs.step({seq: 11})
    counts = lm.model.expert_counts()
    assert counts.shape == (1, lm.config.num_experts)
    assert int(counts.sum()) == 11 * lm.config.top_k
    assert load_model(tiny_model_dir("llama")).model.expert_counts() is None
