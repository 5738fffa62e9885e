"""The models meshserve ships (meshserve/assets/models): small enough, better than a unigram model, and
greedy output in meshserve equal to transformers' token for token, for the MoE target and the draft."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from meshserve.assets import ASSETS, TINY_DRAFT, TINY_MOE
from meshserve.engine import LLM, SamplingParams

PROMPTS = [
    "def fibonacci(n):\n    ",
    "import os\nimport sys\n\n\nclass Reader:\n    def __init__(self, path):\n",
    "    for key, value in sorted(items.items()):\n        if",
]
MAX_TOKENS = 24


def test_both_models_fit_in_30_mb():
    size = sum(f.stat().st_size for f in (ASSETS / "models").rglob("*") if f.is_file())
    assert size < 30e6


def test_held_out_loss_is_well_below_the_unigram_baseline():
    metrics = json.loads((ASSETS / "models" / "training.json").read_text())
    loss = metrics["held_out_loss"]
    assert loss["target"] < 0.75 * loss["unigram"]
    assert loss["draft"] < 0.85 * loss["unigram"]


@pytest.mark.parametrize("path", [TINY_MOE, TINY_DRAFT], ids=["tiny-moe", "tiny-draft"])
def test_greedy_matches_transformers(path):
    with LLM(str(path), dtype="float32", max_num_seqs=4) as llm:  # transformers below runs float32
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
        ids = [o.prompt_token_ids for o in outs]
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [
            hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)[
                0, len(p) :
            ].tolist()
            for p in ids
        ]
    assert [o.token_ids for o in outs] == expected
    assert all(len(o.token_ids) > 0 for o in outs)
