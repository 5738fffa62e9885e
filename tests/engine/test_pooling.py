"""Embeddings through the engine: prompt-only requests whose final hidden states are pooled, matching
transformers' last hidden state (after the final norm), however the engine chunks and batches them."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel

from meshserve.engine import LLM, PoolingParams, SamplingParams
from meshserve.errors import InputError
from meshserve.models.pooling_config import read_pooling

PROMPTS = [[1, 5, 9, 33, 7], [1] + list(range(40, 77)), [1, 2]]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def expected(model_dir) -> dict[str, list[torch.Tensor]]:
    """transformers' final hidden states per prompt, pooled three ways and L2-normalized."""
    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: dict[str, list[torch.Tensor]] = {"LAST": [], "MEAN": [], "CLS": []}
    with torch.no_grad():
        for p in PROMPTS:
            h = hf(torch.tensor([p])).last_hidden_state[0]
            for kind, v in (("LAST", h[-1]), ("MEAN", h.mean(0)), ("CLS", h[0])):
                out[kind].append(torch.nn.functional.normalize(v, dim=0))
    return out


@pytest.mark.parametrize("kind", ["LAST", "MEAN", "CLS"])
def test_embeddings_match_transformers_in_small_chunks(model_dir, expected, kind):
    llm = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=8, block_size=4)
    outs = llm.embed(PROMPTS, PoolingParams(kind), use_tqdm=False)
    for out, want in zip(outs, expected[kind], strict=True):
        assert out.finished and out.outputs[0].finish_reason == "stop"
        torch.testing.assert_close(out.embedding, want, atol=2e-5, rtol=1e-4)
        assert abs(float(out.embedding.norm()) - 1) < 1e-5
    blocks = llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks  # no KV kept afterwards


def test_pooling_batches_with_generation_and_changes_nothing(model_dir, expected):
    """Embeddings and generations in the same steps: each is what it is alone, and a cached prefix (APC)
    does not leak into MEAN pooling."""
    llm = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=16, block_size=4)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = [o.token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    engine = llm.engine
    gen_ids = [engine.add_request(p, greedy) for p in PROMPTS]
    emb_ids = [engine.add_request(p, PoolingParams("MEAN")) for p in PROMPTS]  # prefixes cached above
    plans, schedule = [], engine.scheduler.schedule
    engine.scheduler.schedule = lambda: plans.append(schedule()) or plans[-1]
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step()})
    assert any(len({it.request.pooling is None for it in plan.items}) == 2 for plan in plans)
    assert [done[i].token_ids for i in gen_ids] == alone
    for i, want in zip(emb_ids, expected["MEAN"], strict=True):
        torch.testing.assert_close(done[i].embedding, want, atol=2e-5, rtol=1e-4)


def test_unnormalized_and_errors(model_dir):
    llm = LLM(str(model_dir), dtype="float32", max_model_len=32)
    (raw,) = llm.embed([PROMPTS[0]], PoolingParams("last", normalize=False), use_tqdm=False)
    (unit,) = llm.embed([PROMPTS[0]], use_tqdm=False)
    torch.testing.assert_close(raw.embedding / raw.embedding.norm(), unit.embedding)
    with pytest.raises(InputError, match="pooling_type: must be one of LAST, MEAN, CLS"):
        PoolingParams("max")
    with pytest.raises(InputError, match="prompt: 33 tokens is too long: at most max_model_len = 32"):
        llm.embed([[1] * 33], use_tqdm=False)
    assert len(llm.embed([[1] * 32], use_tqdm=False)[0].embedding) == llm.engine.model_config.hidden_size


def test_sentence_transformers_pooling_is_the_default(tmp_path):
    assert read_pooling(tmp_path) == {}
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert read_pooling(tmp_path) == {"pooling_type": "MEAN", "normalize": False}
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True})
    )
    with pytest.raises(InputError, match="1_Pooling/config.json: one pooling mode at a time"):
        read_pooling(tmp_path)


def test_a_preempted_pooling_request_folds_again_from_the_start(model_dir, expected):
    """A generation that grows until the KV cache is full preempts a later pooling request mid-prompt;
    the pooling request is recomputed and its embedding is still the whole prompt's."""
    llm = LLM(
        str(model_dir),
        dtype="float32",
        max_num_batched_tokens=8,
        block_size=4,
        num_kv_blocks=12,
        max_model_len=48,
    )
    engine = llm.engine
    engine.add_request([1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    pooled = engine.add_request(PROMPTS[1], PoolingParams("MEAN"))
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step()})
    assert engine.num_preemptions > 0
    torch.testing.assert_close(done[pooled].embedding, expected["MEAN"][1], atol=2e-5, rtol=1e-4)
