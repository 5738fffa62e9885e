"""bfloat16 checkpoints load and run, staying close to transformers in bfloat16."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from meshserve.kernels.profile import GemmTable
from meshserve.kernels.smooth_gemm import GemmChoice
from meshserve.models import load_model
from meshserve.testing import PagedSequences

# Every SmoothGEMM primitive, forced for all M (linears and MoE experts alike), stays within tolerance.
KERNELS = [
    None,
    GemmChoice("packed"),
    GemmChoice("packed_f32", 16),
    GemmChoice("bf16_fma"),
    GemmChoice("dpbf16"),
    GemmChoice("brgemm"),
]


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda c: "unprepared" if c is None else c.name)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_bfloat16_runs_close_to_transformers(arch, kernel, tiny_model_dir):
    path = tiny_model_dir(arch)
    lm = load_model(path, dtype="bfloat16")
    if kernel is not None:
        lm.model.prepare_gemms(GemmTable({"bfloat16": {"*": [(1, kernel)]}}), max_tokens=64)
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
