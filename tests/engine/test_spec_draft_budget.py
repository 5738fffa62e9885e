"""The draft model's KV cache (contiguous per-slot, grown on demand) is counted in the engine's KV budget:
the blocks get what the draft's largest cache leaves, and the draft never grows past what was counted."""

from __future__ import annotations

import pytest

from meshserve.engine import Engine, SamplingParams
from meshserve.engine.kv_cache import block_bytes
from meshserve.engine.spec.draft_runner import DraftRunner
from meshserve.engine.spec.layer_skip import write_layer_skip_draft


@pytest.mark.parametrize("disable_by_batch_size", [None, 3])
def test_draft_kv_is_counted_in_the_budget_and_stays_within_it(
    tiny_model_dir, tmp_path, disable_by_batch_size
):
    target = tiny_model_dir("llama", num_hidden_layers=3)
    draft = write_layer_skip_draft(target, tmp_path / "draft", 1)
    spec = {
        "method": "draft_model",
        "model": str(draft),
        "num_speculative_tokens": 2,
        "disable_by_batch_size": disable_by_batch_size,
    }
    engine = Engine.from_args(
        str(target),
        max_num_seqs=6,
        max_model_len=128,
        block_size=4,
        kv_cache_memory=0.002,
        speculative_config=spec,
    )
    mc, runner = engine.model_config, engine.spec.proposer.runner
    per_block = block_bytes(mc.num_layers, mc.num_kv_heads, mc.head_dim, 4, mc.dtype)
    slots = 6 if disable_by_batch_size is None else 3  # requests that may hold a draft slot at once
    assert engine.spec.kv_bytes == slots * DraftRunner.slot_bytes(runner.model, 128) > 0
    assert engine.blocks.num_blocks == (int(0.002 * (1 << 30)) - engine.spec.kv_bytes) // per_block

    for i in range(8):  # more requests than slots: the 6 running ones draft while the batch allows
        engine.add_request(
            [1, 5 + i, 9, 7] * 3, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        )
    while engine.has_unfinished():
        engine.step()
        held = sum(cache.numel() * cache.element_size() for cache in runner.kv)
        assert runner.num_slots <= slots and held <= engine.spec.kv_bytes
    assert engine.spec.verify_steps > 0
