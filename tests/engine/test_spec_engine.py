"""Prefix caching x speculative decoding x chunk budget inside one engine: greedy output equals transformers'
token for token in every combination, on mixed batches (prompts sharing prefixes, prompts that repeat)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from meshserve.engine import LLM, SamplingParams
from meshserve.engine.spec.layer_skip import write_layer_skip_draft

MAX_TOKENS = 12
ALWAYS = {"disable_by_batch_size": None}  # speculate at every batch size: these tests check its mechanics
SPEC = {
    "off": None,
    "ngram": {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "prompt_lookup_max": 3,
        "prompt_lookup_min": 1,
        **ALWAYS,
    },
    "draft": {"method": "draft_model", "num_speculative_tokens": 2, **ALWAYS},
}
BUDGETS = {
    "small": {"max_num_batched_tokens": 7, "max_num_seqs": 4},
    "large": {"max_num_batched_tokens": 512, "max_num_seqs": 8},
}


def mixed_prompts(vocab: int) -> list[list[int]]:
    """Two prompts sharing a 13-token prefix, a repetitive one, a one-token one, and two random ones."""
    gen = torch.Generator().manual_seed(11)
    rand = lambda n: torch.randint(3, vocab, (n,), generator=gen).tolist()  # noqa: E731
    shared = [1] + rand(12)
    return [shared + rand(5), rand(6) * 4, [1], shared + rand(9), [1] + rand(30), rand(3)]


def spec_config(spec: str, draft) -> dict | None:
    if SPEC[spec] is None:
        return None
    return {**SPEC[spec], "model": str(draft)} if spec == "draft" else SPEC[spec]


@pytest.fixture(scope="module", params=["llama", "qwen2_moe"])
def case(request, tiny_model_dir, tmp_path_factory):
    """Target directory, a layer-skip draft of it, the prompts and transformers' greedy continuations."""
    path = tiny_model_dir(request.param, num_hidden_layers=3)
    draft = write_layer_skip_draft(path, tmp_path_factory.mktemp("draft") / request.param, 1)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    prompts = mixed_prompts(hf.config.vocab_size)
    with torch.no_grad():
        expected = [
            hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]
    return path, draft, prompts, expected


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("spec", list(SPEC))
@pytest.mark.parametrize("caching", [True, False], ids=["apc", "no-apc"])
def test_greedy_matches_transformers(case, caching, spec, budget):
    path, draft, prompts, expected = case
    config = spec_config(spec, draft)
    llm = LLM(
        str(path), enable_prefix_caching=caching, speculative_config=config, block_size=4, **BUDGETS[budget]
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for _ in range(2):  # the second round finds the first round's blocks in the prefix cache
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.token_ids for o in outputs] == expected
    engine, stats = llm.engine, llm.engine.last_stats
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and not any(engine.blocks.ref_counts)
    if caching:
        assert stats["prefix_hit_rate"] > 0.3  # hits stay above zero with speculative decoding on
    else:
        assert "prefix_hit_rate" not in stats
    if spec != "off":
        assert stats["spec_mean_accepted_len"] >= 1.0 and 0 <= stats["spec_acceptance_rate"] <= 1
        assert engine.spec.verify_steps > 0
    if spec == "ngram":
        assert stats["spec_acceptance_rate"] > 0  # the repetitive prompt gets drafts accepted


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_sampled_requests_through_verification(case, spec):
    path, draft, prompts, expected = case
    config = spec_config(spec, draft)
    llm = LLM(str(path), speculative_config=config, block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    # top_k=1 makes the target distribution one-hot: verification must then reproduce greedy output.
    top1 = SamplingParams(temperature=0.8, top_k=1, max_tokens=MAX_TOKENS, ignore_eos=True, seed=3)
    assert [o.token_ids for o in llm.generate(prompts, top1, use_tqdm=False)] == expected
    # Seeded sampling is reproducible with drafts in the loop.
    seeded = [
        SamplingParams(temperature=1.0, top_p=0.9, max_tokens=MAX_TOKENS, ignore_eos=True, seed=i)
        for i in range(len(prompts))
    ]
    runs = [[o.token_ids for o in llm.generate(prompts, seeded, use_tqdm=False)] for _ in range(2)]
    assert runs[0] == runs[1] and runs[0] != expected
    assert llm.engine.spec.verify_steps > 0


def test_cli_takes_speculative_config_as_json(tiny_model_dir, monkeypatch, capsys):
    from meshserve import cli

    base = [
        "meshserve",
        "generate",
        "--model",
        str(tiny_model_dir("llama")),
        "--prompt",
        "hello hello",
        "--max-tokens",
        "6",
    ]
    monkeypatch.setattr("sys.argv", [*base, "--speculative-config", '{"method": "ngram"}'])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code in (0, None) and capsys.readouterr().out.strip()
    monkeypatch.setattr("sys.argv", [*base, "--speculative-config", '{"method": "medusa"}'])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 2 and "speculative_config.method" in capsys.readouterr().err


def test_prefill_decode_and_verify_share_steps(tiny_model_dir):
    from meshserve.engine import Engine

    engine = Engine.from_args(
        str(tiny_model_dir("llama")),
        max_num_batched_tokens=24,
        max_num_seqs=8,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3, **ALWAYS},
    )
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kinds = []
    for i, prompt in enumerate([[30, 31] * 8, [1, 2, 3, 4], [40, 41, 42] * 5, [1] + list(range(100, 160))]):
        engine.add_request(prompt, params)
        for _ in range(3 if i < 3 else 0):
            engine.step()
            kinds.append(engine.last_stats["tokens"])
    while engine.has_unfinished():
        engine.step()
        kinds.append(engine.last_stats["tokens"])
    assert all(sum(k.values()) <= 24 for k in kinds)  # one token budget for all three kinds
    assert any(k["prefill"] and k["verify"] for k in kinds)
    assert any(k["prefill"] and k["verify"] and k["decode"] for k in kinds)


def test_speculation_pauses_while_the_batch_is_larger_than_disable_by_batch_size(tiny_model_dir):
    from meshserve.engine import Engine

    engine = Engine.from_args(
        str(tiny_model_dir("llama")),
        max_num_seqs=8,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 2},
    )
    repetitive = [[30 + i, 31 + i] * 8 for i in range(4)]
    for i, prompt in enumerate(repetitive):  # different lengths: the batch shrinks as requests finish
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=4 + 8 * i, ignore_eos=True))
    verify_by_running = []
    while engine.has_unfinished():
        running = len(engine.scheduler.running)
        engine.step()
        verify_by_running.append((running, engine.last_stats["tokens"]["verify"]))
    assert all(verify == 0 for running, verify in verify_by_running if running > 2)
    assert any(verify > 0 for running, verify in verify_by_running if running <= 2)


def test_a_draft_confidence_proposes_fewer_drafts_and_keeps_greedy_output(case):
    path, draft, prompts, expected = case
    drafts_per_verify = {}
    for confidence in (None, 0.011):  # the random layer-skip draft's top probabilities are ~0.006-0.03
        config = {**spec_config("draft", draft), "num_speculative_tokens": 3, "draft_confidence": confidence}
        llm = LLM(str(path), speculative_config=config, block_size=4, **BUDGETS["large"])
        outputs = llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False
        )
        assert [o.token_ids for o in outputs] == expected
        drafts_per_verify[confidence] = llm.engine.spec.draft_tokens / llm.engine.spec.verify_steps
    assert 0 < drafts_per_verify[0.011] < drafts_per_verify[None]
