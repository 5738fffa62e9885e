"""Speculative decoding after the hand-off with the proposers that keep state of their own: a draft model
(its own KV, built on the decode side for a request it never saw prefill) and a model's MTP layer (its
hidden state, which does not travel). Greedy tokens equal the mixed engine's, drafts are accepted on the
decode side, and every block comes back on both sides."""

from __future__ import annotations

import pytest

from meshserve.engine import LLM, Engine
from meshserve.engine.spec.layer_skip import write_layer_skip_draft
from tests.engine.pd.test_roles import run_pair
from tests.engine.pd.workload import ARGS, GREEDY, PROMPTS
from tests.engine.test_spec_mtp import copying_mtp


def engines_agree(model: str, spec: dict) -> Engine:
    """Run the workload mixed and as a prefill/decode pair with ``spec``; returns the decode engine."""
    args = {**ARGS, "speculative_config": spec}
    with LLM(model, **args) as llm:
        expected = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    prefill = Engine.from_args(model, role="prefill", **args)
    decode = Engine.from_args(model, role="decode", **args)
    outs = run_pair(prefill, decode, PROMPTS, GREEDY)
    assert [o.token_ids for o in outs.values()] == expected
    for engine in (prefill, decode):
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    return decode


def test_a_draft_model_speculates_on_the_decode_side(tiny_model_dir, tmp_path):
    target = tiny_model_dir("llama", num_hidden_layers=2)
    twin = write_layer_skip_draft(target, tmp_path / "twin", 2)  # every layer: the target's own tokens
    spec = {"method": "draft_model", "model": str(twin), "num_speculative_tokens": 3}
    decode = engines_agree(str(target), spec)
    # Every draft accepted: the draft's KV, built on the decode side from the handed-off tokens, is right.
    assert decode.last_stats["spec_acceptance_rate"] == 1.0


@pytest.mark.parametrize("steps", [1, 3])
def test_an_mtp_layer_speculates_on_the_decode_side(tiny_model_dir, tmp_path, steps):
    # The MTP layer made to repeat the target's guess (test_spec_mtp.py): its drafts get accepted.
    model = copying_mtp(tiny_model_dir("deepseek_v3", num_nextn_predict_layers=1), tmp_path / "copying")
    decode = engines_agree(str(model), {"method": "mtp", "num_speculative_tokens": steps})
    assert decode.spec.draft_tokens > 0 and decode.spec.accepted_tokens > 0
