"""Why absorbed MLA decodes cannot give transformers' bfloat16 greedy tokens, measured (docs/deepseek.md).

Transformers' eager MLA rounds to bfloat16 at five places: kv_b_proj's output (every head's K and V
elements), the scores, the scaled scores, the softmax and the P.V output. `eager_mla` below reproduces all
five over the paged latent cache; with K and V rounded its logits are transformers' bit for bit. Leave only
the K / V rounding out, as any absorbed form must (W_UK folds into the query and W_UV applies after P.c, so
no K or V element ever exists to round, and rounding is not linear), and the logits move by a few hundredths
and near-ties flip. So the absorbed decode's tokens are checked for closeness here, and the token equality
test runs MLA expanded (test_deepseek.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from meshserve.kernels.meta_attention import write_kv
from meshserve.models import load_model
from meshserve.models.layers.attention import StepInputs
from meshserve.models.layers.mla import LatentAttention
from meshserve.testing import PagedSequences
from tests.models.test_deepseek import prompts


def eager_mla(
    layer: LatentAttention,
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    key: torch.Tensor,
    kv_cache: torch.Tensor,
    step: StepInputs,
    round_kv: bool,
) -> torch.Tensor:
    """Transformers' eager bfloat16 MLA for one sequence's rows ([T, H, v]), K / V rounded or not."""
    m, heads, dtype, meta = layer.mla, layer.num_heads, q_nope.dtype, step.meta
    write_kv(key[:, None, :], key[:, None, :], kv_cache, meta.slot_mapping)
    length, block = int(meta.seq_lens[0]), kv_cache.shape[2]
    pos = torch.arange(length)
    rows = kv_cache[0].reshape(-1, key.shape[-1])[
        meta.block_tables[0].long()[pos // block] * block + pos % block
    ]
    latent, k_pe = rows.float().split((m.kv_lora_rank, m.qk_rope_head_dim), dim=-1)
    kv = F.linear(latent, layer.kv_b_proj.weight.float())  # exact products of bfloat16 values
    if round_kv:
        kv = kv.to(dtype).float()  # what transformers' bfloat16 kv_b_proj returns
    k_nope, v = kv.unflatten(-1, (heads, -1)).split((m.qk_nope_head_dim, m.v_head_dim), dim=-1)
    scores = torch.einsum("qhn,lhn->hql", q_nope.float(), k_nope)
    scores = (scores + torch.einsum("qhr,lr->hql", q_pe.float(), k_pe)).to(dtype) * m.scale
    q_pos = length - q_nope.shape[0] + torch.arange(q_nope.shape[0])
    scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype).float()
    return torch.einsum("hql,lhv->qhv", probs, v).to(dtype)


def decode_logit_gaps(lm, hf) -> tuple[float, int]:
    """(largest |ours - transformers'| decode logit, prompts whose greedy tokens differ) over the standard
    prompts: prefill, then 8 one-token decodes fed transformers' bfloat16 greedy tokens."""
    gap, flipped = 0.0, 0
    for p in prompts(lm.config.vocab_size):
        with torch.no_grad():
            tokens = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0]
            ref = hf(tokens[None, :-1]).logits[0, len(p) - 1 :].float()
        seqs = PagedSequences(lm)
        seq = seqs.add(p)
        rows = [seqs.step({seq: len(p)})[seq][-1:]]
        for t in tokens[len(p) : -1].tolist():
            seqs.tokens[seq].append(t)
            rows.append(seqs.step({seq: 1})[seq])
        ours = torch.cat(rows)
        gap = max(gap, float((ours - ref).abs().max()))
        flipped += not torch.equal(ours.argmax(-1), tokens[len(p) :])
    return gap, flipped


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_absorbed_decode_misses_transformers_only_by_the_kv_rounding(arch, tiny_model_dir, monkeypatch):
    path = tiny_model_dir(arch)
    lm = load_model(path, dtype="bfloat16")
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.bfloat16)
    shipped = decode_logit_gaps(lm, hf)  # the native op, absorbed
    gaps = {}
    for round_kv in (True, False):
        monkeypatch.setattr(
            LatentAttention, "_absorbed", lambda self, *a, r=round_kv: eager_mla(self, *a, round_kv=r)
        )
        gaps[round_kv] = decode_logit_gaps(lm, hf)
    print(
        f"{arch} bfloat16 decodes against transformers (max |logit diff|, prompts of 4 with a flipped "
        f"token): absorbed op {shipped[0]:.4f}, {shipped[1]}; transformers' roundings all but K/V "
        f"{gaps[False][0]:.4f}, {gaps[False][1]}; with K/V rounded {gaps[True][0]:.4f}, {gaps[True][1]}"
    )
    assert gaps[True] == (0.0, 0)  # every other rounding is transformers'
    assert 0 < gaps[False][0] < 0.1  # the K / V rounding alone moves the logits
    assert shipped[0] < 0.1
