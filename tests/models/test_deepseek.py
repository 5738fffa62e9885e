"""DeepSeek-V2/V3 (MLA, grouped routing, shared experts) compute what transformers computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from meshserve.engine import LLM, SamplingParams
from meshserve.engine.kv_cache import block_bytes
from meshserve.errors import InputError
from meshserve.models import load_model
from meshserve.models.layers.grouped_moe import GroupedRouter
from meshserve.testing import PagedSequences

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 256,
    "beta_fast": 32,
    "beta_slow": 1,
}
CASES = {
    # q_proj (no q_lora_rank), softmax group-limited routing, 24 + 16 = 40-wide latent rows (the op's
    # run-time-width path; the V3 cases' 48 + 16 = 64 take its fixed-width tiles).
    "v2": ("deepseek_v2", {"kv_lora_rank": 24}),
    "v2_greedy": (
        "deepseek_v2",
        {"topk_method": "greedy", "n_shared_experts": 2, "first_k_dense_replace": 0},
    ),
    # One MTP layer in the checkpoint (read past, unused); sigmoid noaux_tc routing with the correction bias.
    "v3": ("deepseek_v3", {"num_nextn_predict_layers": 1}),
    # YaRN with mscale_all_dim (softmax scale) and rotate-half rope.
    "v3_yarn": (
        "deepseek_v3",
        {"rope_scaling": YARN, "rope_interleave": False, "max_position_embeddings": 1024},
    ),
}
PROMPT_LENGTHS = [1, 6, 13, 29]
ATOL = 1e-4


@pytest.fixture(scope="module", params=list(CASES))
def models(request, tiny_model_dir):
    arch, overrides = CASES[request.param]
    path = tiny_model_dir(arch, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    return load_model(path), hf


def prompts(vocab_size: int, lengths: list[int] = PROMPT_LENGTHS) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [[1] + torch.randint(3, vocab_size, (n - 1,), generator=gen).tolist() for n in lengths]


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def test_config_reads_mla_and_routing(models):
    lm, hf = models
    cfg, ref = lm.config, hf.config
    assert cfg.kv_cache_parts == 1 and cfg.num_kv_heads == 1
    assert cfg.head_dim == ref.kv_lora_rank + ref.qk_rope_head_dim
    assert cfg.mla.scale == pytest.approx(hf.model.layers[0].self_attn.scaling)
    assert cfg.moe_layers == [i for i in range(ref.num_hidden_layers) if i >= ref.first_k_dense_replace]


def test_one_flat_batch_matches_transformers(models):
    lm, hf = models
    seqs = PagedSequences(lm)
    batch = prompts(lm.config.vocab_size)
    ids = [seqs.add(p) for p in batch]
    logits = seqs.step({i: len(p) for i, p in zip(ids, batch, strict=True)})
    for i, p in zip(ids, batch, strict=True):
        torch.testing.assert_close(logits[i], hf_logits(hf, p), atol=ATOL, rtol=0)


def test_prefill_chunks_then_decodes_match_transformers(models):
    """Latent rows written by earlier steps are read back by later chunks and by one-token decodes."""
    lm, hf = models
    seqs = PagedSequences(lm, block_size=4)
    batch = prompts(lm.config.vocab_size)
    ids = [seqs.add(p) for p in batch]
    rows: dict[int, list[torch.Tensor]] = {i: [] for i in ids}
    for work in ({i: min(5, len(p)) for i, p in zip(ids, batch, strict=True)},):
        for i, out in seqs.step(work).items():
            rows[i].append(out)
    while any(seqs.computed[i] < len(p) for i, p in zip(ids, batch, strict=True)):
        work = {i: min(7, len(p) - seqs.computed[i]) for i, p in zip(ids, batch, strict=True)}
        for i, out in seqs.step({i: n for i, n in work.items() if n}).items():
            rows[i].append(out)
    for _ in range(3):  # greedy decodes, one token per sequence per step
        for i in ids:
            seqs.tokens[i].append(int(rows[i][-1][-1].argmax()))
        for i, out in seqs.step(dict.fromkeys(ids, 1)).items():
            rows[i].append(out)
    for i in ids:
        torch.testing.assert_close(torch.cat(rows[i]), hf_logits(hf, seqs.tokens[i]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_bfloat16_runs_close_to_transformers(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    lm = load_model(path, dtype="bfloat16")
    routers = [m for m in lm.model.modules() if isinstance(m, GroupedRouter)]
    assert routers and all(p.dtype == torch.float32 for r in routers for p in r.parameters())  # as HF keeps
    seqs = PagedSequences(lm)
    tokens = [1] + list(range(10, 40))
    seq = seqs.add(tokens)
    ours = torch.cat([seqs.step({seq: 20})[seq], seqs.step({seq: len(tokens) - 20})[seq]])
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.bfloat16)
    torch.testing.assert_close(ours, hf_logits(hf, tokens), atol=0.1, rtol=0)


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_bfloat16_greedy_tokens_equal_transformers_when_mla_runs_expanded(arch, tiny_model_dir):
    """bfloat16: a prompt's logits are transformers' bit for bit (prefill expands MLA with transformers' eager
    rounding), and with every step expanded the greedy tokens are transformers' bfloat16 tokens. Absorbed
    decodes (the default) reorder the sums (W_UK folded into the query, float32 accumulation over the
    latent width, W_UV after), so a near-tie a few tokens in may go the other way (docs/deepseek.md)."""
    from meshserve.models.layers.mla import LatentAttention

    path = tiny_model_dir(arch)
    lm = load_model(path, dtype="bfloat16")
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.bfloat16)
    batch = prompts(lm.config.vocab_size)
    seqs = PagedSequences(lm)
    seq = seqs.add(batch[-1])
    assert torch.equal(seqs.step({seq: len(batch[-1])})[seq], hf_logits(hf, batch[-1]))
    for module in lm.model.modules():
        if isinstance(module, LatentAttention):
            module.expand = True
    for p in batch:
        with torch.no_grad():
            expected = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        seqs = PagedSequences(lm)
        seq = seqs.add(p)
        logits = seqs.step({seq: len(p)})[seq]
        for _ in range(8):
            seqs.tokens[seq].append(int(logits[-1].argmax()))
            logits = seqs.step({seq: 1})[seq]
        assert seqs.tokens[seq] == expected[0].tolist()


def mixed_batch() -> list[list[int]]:
    """Prompt lengths 1 to 33, two sharing a 17-token prefix, one repetitive (n-gram drafts get accepted)."""
    shared = prompts(512, [17])[0]
    return [shared + [5, 6, 7, 5, 6, 7, 5, 6], *prompts(512, [1, 9, 33]), shared + [9]]


def engine_tokens(path, dtype: str, batch: list[list[int]], rounds: int, **settings) -> list[list[list[int]]]:
    llm = LLM(str(path), dtype=dtype, block_size=4, max_num_batched_tokens=24, max_num_seqs=4, **settings)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    return [[o.token_ids for o in llm.generate(batch, params, use_tqdm=False)] for _ in range(rounds)]


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_engine_greedy_matches_transformers_with_prefix_cache_and_speculation(arch, tiny_model_dir):
    """A batch mixing prompt lengths through the engine, n-gram speculation on, twice: the second round reads
    the first round's latent blocks from the prefix cache."""
    path = tiny_model_dir(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    batch = mixed_batch()
    with torch.no_grad():
        expected = [
            hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)[
                0, len(p) :
            ].tolist()
            for p in batch
        ]
    llm = LLM(
        str(path),
        enable_prefix_caching=True,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3},
        block_size=4,
        max_num_batched_tokens=24,
        max_num_seqs=4,
    )
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for _ in range(2):
        assert [o.token_ids for o in llm.generate(batch, params, use_tqdm=False)] == expected
    stats = llm.engine.last_stats
    assert stats["prefix_hit_rate"] > 0.3 and llm.engine.spec.verify_steps > 0
    assert llm.engine.kv_caches[0].shape[0] == 1  # one latent row per token, no separate V


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_bfloat16_engine_is_the_same_with_prefix_cache_and_speculation(arch, tiny_model_dir):
    """bfloat16 greedy runs drift from transformers' own bfloat16 run after a few tokens (either side's
    rounding decides near ties), so here the cached and speculative schedules must equal the plain one."""
    path, batch = tiny_model_dir(arch), mixed_batch()
    plain = engine_tokens(path, "bfloat16", batch, 1)[0]
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    assert engine_tokens(path, "bfloat16", batch, 2, enable_prefix_caching=True, speculative_config=spec) == [
        plain,
        plain,
    ]


def test_mla_cache_bytes_per_token_beside_full_attention(tiny_model_dir):
    """What the latent cache saves: bytes per token over all layers, MLA against full K/V for the same model
    (every head's keys qk_nope + qk_rope wide and values v_head_dim wide)."""
    for name, shape in {
        "tiny DeepSeek-V3": load_model(tiny_model_dir("deepseek_v3")).config,
        "DeepSeek-V3 (671B)": None,
    }.items():
        if shape is None:  # the real model's numbers, config.json's fields (nothing downloaded)
            layers, heads, latent, rope, nope, v, dtype = 61, 128, 512, 64, 128, 128, torch.bfloat16
        else:
            m = shape.mla
            layers, heads, dtype = shape.num_layers, shape.num_heads, shape.dtype
            latent, rope, nope, v = m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
        mla = block_bytes(layers, 1, latent + rope, 1, dtype, parts=1)
        full = layers * heads * (nope + rope + v) * dtype.itemsize
        print(f"{name}: MLA {mla} B/token, full attention {full} B/token ({full / mla:.1f}x)")
        assert mla == layers * (latent + rope) * dtype.itemsize and full > mla


def test_grouped_router_matches_transformers():
    """Expert ids and weights of every routing method equal transformers' routers on random gates."""
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from meshserve.models.layers.grouped_moe import GroupedRouting

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 32, generator=gen)
    weight, bias = torch.randn(16, 32, generator=gen) * 0.3, torch.randn(16, generator=gen) * 0.1
    common = {
        "hidden_size": 32,
        "n_routed_experts": 16,
        "num_experts_per_tok": 3,
        "n_group": 4,
        "topk_group": 2,
    }
    cases = [
        (
            DeepseekV3TopkRouter(DeepseekV3Config(**common, routed_scaling_factor=2.5)),
            "sigmoid",
            "noaux_tc",
            True,
        ),
        (DeepseekV2TopkRouter(DeepseekV2Config(**common, topk_method="greedy")), "softmax", "greedy", False),
        (
            DeepseekV2TopkRouter(DeepseekV2Config(**common, topk_method="group_limited_greedy")),
            "softmax",
            "group_limited_greedy",
            False,
        ),
    ]
    for theirs, scoring, method, norm in cases:
        theirs.weight.data.copy_(weight)
        if hasattr(theirs, "e_score_correction_bias"):
            theirs.e_score_correction_bias.copy_(bias)
        routing = GroupedRouting(scoring, method, 4, 2, norm, theirs.routed_scaling_factor)
        ours = GroupedRouter(32, 16, routing, 3)
        ours.weight.data.copy_(weight)
        if ours.e_score_correction_bias is not None:
            ours.e_score_correction_bias.data.copy_(bias)
        with torch.no_grad():
            _, ref_w, ref_ids = theirs(x)
            w, ids = ours(x)
        ref_ids, order = ref_ids.sort(-1)
        ids, mine = ids.sort(-1)
        assert torch.equal(ids, ref_ids), method
        torch.testing.assert_close(w.gather(1, mine), ref_w.gather(1, order), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"topk_method": "random"}, "config.json:topk_method"),
        ({"scoring_func": "relu"}, "config.json:scoring_func"),
        ({"n_group": 3}, "config.json:n_group"),
        ({"topk_group": 5}, "config.json:topk_group"),
        ({"num_experts_per_tok": 5, "topk_group": 1}, "config.json:num_experts_per_tok"),
        ({"q_lora_rank": None, "attention_bias": True}, "config.json:attention_bias"),
        ({"qk_rope_head_dim": 15}, "config.json:qk_rope_head_dim"),
        ({"kv_lora_rank": 0}, "config.json:kv_lora_rank"),
    ],
)
def test_bad_deepseek_config_names_the_field(overrides, field, tmp_path):
    import json

    from meshserve.models.loader import load_config
    from meshserve.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "m", arch="deepseek_v3")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **overrides}))
    with pytest.raises(InputError) as err:
        load_config(path)
    assert err.value.field == field


@pytest.mark.parametrize("form", ["expanded", "absorbed"])
def test_prefill_forms_both_match_transformers(form, tiny_model_dir):
    """Forced either way, MLA prefill (a first chunk, then a chunk over cached rows) and decodes equal
    transformers; left alone, a fresh prompt expands and one-token decodes stay absorbed."""
    from meshserve.models.layers.mla import LatentAttention, expanded_prefill

    path = tiny_model_dir("deepseek_v3")
    lm, hf = load_model(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for module in lm.model.modules():
        if isinstance(module, LatentAttention):
            module.expand = form == "expanded"
    seqs = PagedSequences(lm, block_size=4)
    tokens = prompts(lm.config.vocab_size, [19])[0]
    seq = seqs.add(tokens)
    rows = [seqs.step({seq: 11})[seq], seqs.step({seq: 8})[seq]]
    seqs.tokens[seq].append(int(rows[-1][-1].argmax()))
    rows.append(seqs.step({seq: 1})[seq])
    torch.testing.assert_close(torch.cat(rows), hf_logits(hf, seqs.tokens[seq]), atol=ATOL, rtol=0)

    from meshserve.engine.runner import batch_metadata

    def meta(start: int, n: int):
        ones = np.ones(1, dtype=np.int64)
        return batch_metadata(np.array([start]), np.array([n]), ones, [list(range(64))], 4)

    mla = lm.config.mla
    assert expanded_prefill(meta(0, 19), mla) and not expanded_prefill(meta(40, 1), mla)


def test_expanded_prefill_in_query_slices_gives_the_same_logits(tiny_model_dir, monkeypatch):
    """A long prompt's expanded scores are computed in query slices (bounded memory), bit for bit alike."""
    import meshserve.models.layers.mla as mla

    lm = load_model(tiny_model_dir("deepseek_v3"), dtype="bfloat16")
    tokens = prompts(lm.config.vocab_size, [41])[0]
    outs = []
    for budget in (mla.SCORE_ELEMENTS, 300):  # 300: a few query rows per slice at 4 heads
        monkeypatch.setattr(mla, "SCORE_ELEMENTS", budget)
        seqs = PagedSequences(lm)
        seq = seqs.add(tokens)
        outs.append(seqs.step({seq: len(tokens)})[seq])
    assert torch.equal(outs[0], outs[1])
