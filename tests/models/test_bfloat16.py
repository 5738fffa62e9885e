"""bfloat16 checkpoints load and run, staying close to transformers in bfloat16."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from meshserve.models import load_model
from meshserve.testing import PagedSequences


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_bfloat16_runs_close_to_transformers(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    lm = load_model(path, dtype="bfloat16")
    assert lm.config.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    seqs = PagedSequences(lm)
    tokens = [1] + list(range(10, 40))
    seq = seqs.add(tokens)
    first = seqs.step({seq: 20})[seq]
    rest = seqs.step({seq: len(tokens) - 20})[seq]
    ours = torch.cat([first, rest])
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].float()
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=0.1, rtol=0)
