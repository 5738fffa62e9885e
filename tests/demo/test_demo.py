"""The demo's pieces on tiny random models: the workload, the serving run that records a trace, and the
trace's replays, as recorded, on the 2x4 and 8x8 meshes against the shipped model's wafer preset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from meshserve.assets import TINY_MOE, TINY_MOE_WAFER
from meshserve.demo.replay import MESHES, replay_recorded
from meshserve.demo.serving import run_serving, workload
from meshserve.engine import LLM, SamplingParams
from meshserve.errors import InputError
from meshserve.models.tokenizer import Tokenizer
from meshserve.traces import ExpertTrace
from meshserve.wafer.models import load_model
from meshserve.wafer.synthetic import synthetic_trace

# The shipped target's routing shape (meshserve/assets/models/tiny-moe) on a random model: layer 0 dense,
# then 3 MoE layers of 64 experts, top-8 from the best 4 of 8 groups.
SHIPPED_SHAPE = {
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "n_routed_experts": 64,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "moe_intermediate_size": 16,
}


def test_workload_mixes_lengths_and_shares_a_prefix(tiny_model_dir):
    tok = Tokenizer.from_dir(tiny_model_dir("mixtral"))
    (first, params1), (second, params2) = workload(tok)
    assert len({len(p) for p in first}) > 5  # different lengths
    prefix = first[-1][:160]
    assert all(p[:160] == prefix for p in second) and len(second) == 5
    assert all(p.temperature == 0 for p in params1 + params2)


def test_serving_reports_figures_and_records_the_trace(tmp_path, tiny_model_dir):
    target = tiny_model_dir("mixtral")
    draft = tiny_model_dir("llama")  # same tokenizer and vocabulary as the target
    r = run_serving(tmp_path, target, draft)
    assert len(r.outputs) == 16 and r.output_tokens == sum(len(o.token_ids) for o in r.outputs)
    assert (r.ttft_s > 0).all() and (r.tpot_s > 0).all()
    assert 0 < r.prefix_hit_rate <= 1  # the second wave reuses the shared prefix's blocks
    assert 0 <= r.acceptance_rate <= 1
    trace = ExpertTrace.load(r.trace)
    assert trace.counts.shape[1:] == (2, 4) and trace.source == "engine"
    per_layer = trace.counts.sum(axis=2)  # every layer routes the step's tokens, top_k slots each
    assert (per_layer == per_layer[:, :1]).all() and (per_layer % trace.top_k == 0).all()
    assert per_layer.sum() > 0


def test_the_shipped_model_and_its_wafer_preset_have_one_routing_shape():
    cfg = json.loads((TINY_MOE / "config.json").read_text())
    model = load_model(str(TINY_MOE_WAFER))
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert model.num_layers == cfg["num_hidden_layers"]
    assert model.first_dense_layers == cfg["first_k_dense_replace"]
    assert (model.routed_experts, model.top_k) == (cfg["n_routed_experts"], cfg["num_experts_per_tok"])
    assert model.shared_experts == cfg["n_shared_experts"]
    assert {k: cfg[k] for k in SHIPPED_SHAPE if k != "moe_intermediate_size"} == {
        k: v for k, v in SHIPPED_SHAPE.items() if k != "moe_intermediate_size"
    }


def test_a_recorded_deepseek_trace_replays_on_both_meshes_as_it_is(tmp_path, tiny_model_dir):
    path = tmp_path / "expert_trace.npz"
    with LLM(str(tiny_model_dir("deepseek_v3", **SHIPPED_SHAPE)), record_expert_trace=str(path)) as llm:
        llm.generate([[1, 5, 6, 7, 8], [1, 9]], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    recorded = ExpertTrace.load(path)
    assert recorded.counts.shape[1:] == (3, 64) and recorded.top_k == 8
    by_mesh = replay_recorded(path, tmp_path, min_iterations=2 * recorded.num_steps)
    assert list(by_mesh) == [label for label, *_ in MESHES]
    for label, rows in by_mesh.items():
        by = {(row["mapping"], row["balancer"]): row for row in rows}
        assert set(by) == {("baseline", "none"), ("er", "none"), ("er", "greedy"), ("er", "ni")}
        assert by[("er", "none")]["a2a_s"] <= by[("baseline", "none")]["a2a_s"]
        assert all(row["iterations"] == 2 * recorded.num_steps for row in rows)  # looped twice, not refit
        assert (tmp_path / f"replay-{label}" / "balance_load_over_time.png").is_file()
    looped = ExpertTrace.load(tmp_path / "expert_trace_looped.npz")
    assert np.array_equal(looped.counts[: recorded.num_steps], recorded.counts)  # the counts themselves


def test_a_trace_of_another_shape_is_refused_not_stretched(tmp_path):
    old = synthetic_trace(  # the Mixtral tiny-moe's shape: 4 MoE layers x 8 experts, top-2
        model="tiny-moe", num_layers=4, num_experts=8, top_k=2, tokens_per_step=32, steps=4, seed=0
    ).save(tmp_path / "old.npz")
    with pytest.raises(InputError, match="old.npz"):
        replay_recorded(old, tmp_path)


def test_printed_samples_skip_completions_that_read_as_escapes():
    from types import SimpleNamespace

    from meshserve.demo import _readable_samples

    class Chars:  # a token is a character code
        def decode(self, ids):
            return "".join(map(chr, ids))

    def out(prompt: str, text: str):
        return SimpleNamespace(prompt_token_ids=[ord(c) for c in prompt], text=text)

    escapes = out("data = b'\\xff\\xfe", "\\x00a\\x00b\\x00c\\x00")
    loop = out("def g(x):\n", "#\n" * 20)
    code = [out(f"def f{i}(x):\n", "    y = x + 1\n    return y\n") for i in range(3)]
    samples = _readable_samples(Chars(), [escapes, loop, *code], 3)
    assert len(samples) == 3 and all(p.startswith("def f") for p, _ in samples)
