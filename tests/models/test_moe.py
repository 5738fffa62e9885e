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


def test_expert_parallel_slots_hold_and_migrate_only_the_packed_copy():
    """A rank's slots are the fused op's packed blocks (no stacked weights); a slot's parts are views of them,
    so what a migration writes into an empty slot serves exactly what the source slot served."""
    from meshserve.kernels.fused_moe import moe_reference
    from meshserve.models.layers.moe_ep import SlotExperts

    torch.manual_seed(0)
    moe = SparseMoE(64, 48, num_experts=6, top_k=2, renormalize=True, weights_in_model_dtype=False)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    gate_up, down = moe.experts.gate_up_proj.detach().clone(), moe.experts.down_proj.detach().clone()
    moe.experts.prepare([], [], fused=True)
    held = torch.tensor([4, 1, 3])
    slots = SlotExperts.held(moe.experts, held)
    assert slots.experts.gate_up_proj.is_meta and slots.experts.packed is not None
    x, slot = torch.randn(10, 64), torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1])
    ones = torch.ones(10, 1)
    expected = moe_reference(x, slot[:, None], ones, gate_up[held], down[held])
    with torch.no_grad():
        torch.testing.assert_close(slots.run(x, slot), expected, atol=1e-5, rtol=1e-5)
        moved = SlotExperts.empty(64, 48, 3, torch.float32, packed=True)
        assert [p.numel() for p in moved.parts(0)] == moved.part_sizes() == slots.part_sizes()
        for s in range(3):  # what Migration does, chunk by chunk, into views of the new slots
            for dst, src in zip(moved.parts(2 - s), slots.parts(s), strict=True):
                dst.copy_(src)
        torch.testing.assert_close(moved.run(x, 2 - slot), expected, atol=1e-5, rtol=1e-5)
