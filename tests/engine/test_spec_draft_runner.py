"""The draft's lean forward (contiguous KV slots, SDPA) computes what the paged forward computes."""

from __future__ import annotations

import pytest
import torch

from meshserve.engine import LLM, SamplingParams
from meshserve.engine.spec.draft_runner import DraftRunner
from meshserve.models import load_model


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {}),
        ("qwen2", {}),  # q/k/v biases
        ("qwen3_moe", {}),  # per-head q/k norm, MoE layers through the model's own block
        ("mixtral", {"sliding_window": 6}),  # a window shorter than the contexts
    ],
)
def test_lean_greedy_path_equals_the_engines(tiny_model_dir, arch, overrides) -> None:
    path = tiny_model_dir(arch, **overrides)
    prompts = [list(range(40, 57)), list(range(90, 96)), [1, 5, 6, 7, 5, 6]]
    engine_out = LLM(str(path), max_num_seqs=4).generate(
        prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    runner = DraftRunner(load_model(path).model, max_len=64, slots=2)  # 3 requests: the cache grows once
    slots = torch.tensor([runner.acquire() for _ in prompts])
    lens = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = torch.tensor(p)
    starts = torch.zeros(len(prompts), dtype=torch.long)
    tokens = []
    for _ in range(8):  # the whole prompts in one padded forward, then one token per request per forward
        picked = runner.forward(slots, starts, ids, lens).argmax(-1)
        tokens.append(picked)
        starts, lens, ids = starts + lens, torch.ones_like(lens), picked[:, None]
    assert torch.stack(tokens, 1).tolist() == [o.token_ids for o in engine_out]
