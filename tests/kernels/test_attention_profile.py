"""profile_attention measures candidate tiles on this machine and writes what tile_sizes then reads."""

from __future__ import annotations

import json

import torch

from meshserve.kernels import attention_profile, attention_tiles


def test_profile_writes_the_fastest_candidate_and_the_planner_reads_it(tmp_path, monkeypatch, switch):
    monkeypatch.setattr(attention_profile, "PREFILL_ROWS", (8, 16))
    monkeypatch.setattr(attention_profile, "SHORT_ROWS", (8,))
    monkeypatch.setattr(attention_profile, "MIN_SPLIT_KV", (256,))
    monkeypatch.setattr(attention_profile, "STEPS", (([0, 30], [20, 1]),))
    switch("MESHSERVE_PROFILE_DIR", str(tmp_path))
    attention_tiles.tile_sizes.cache_clear()

    best = attention_profile.profile_attention(16, 4, 2, torch.float32, repeats=1)

    entries = json.loads((tmp_path / "attention.json").read_text())["entries"]
    assert entries == {
        attention_tiles.profile_key(16, torch.float32): {
            "prefill_rows": best.prefill_rows,
            "short_rows": 8,
            "min_split_kv": 256,
        }
    }
    assert attention_tiles.tile_sizes(16, torch.float32) == best
    attention_tiles.tile_sizes.cache_clear()
