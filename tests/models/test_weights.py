"""Checkpoints load from classic per-expert tensors and from transformers v5's stacked-expert layout alike."""

from __future__ import annotations

import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from meshserve.models import load_model


def test_stacked_expert_checkpoint_loads_like_per_expert_one(tiny_model_dir, tmp_path):
    source = tiny_model_dir("qwen3_moe")
    path = shutil.copytree(source, tmp_path / "stacked")
    tensors = load_file(path / "model.safetensors")
    stacked = {k: v for k, v in tensors.items() if ".experts." not in k}
    prefixes = {m[0] for k in tensors if (m := re.match(r"model\.layers\.\d+\.mlp\.experts", k))}
    for p in prefixes:
        n = len([k for k in tensors if k.startswith(p) and k.endswith("down_proj.weight")])
        gate_up = [torch.cat([tensors[f"{p}.{e}.{w}_proj.weight"] for w in ("gate", "up")]) for e in range(n)]
        stacked[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        stacked[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(n)])
    save_file(stacked, path / "model.safetensors")

    classic, fused = load_model(source).model, load_model(path).model
    expected = dict(classic.named_parameters())
    for name, param in fused.named_parameters():
        assert torch.equal(param, expected[name]), name
