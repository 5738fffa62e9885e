"""The demo's pieces on tiny random models: the workload, the serving run that records a trace, and the
trace's replays on the small mesh and (fitted, scaled) on DeepSeek-V3 over 4 wafers."""

from __future__ import annotations

import numpy as np
import pytest

from meshserve.demo.replay import replay_scaled, replay_small
from meshserve.demo.serving import run_serving, workload
from meshserve.models.tokenizer import Tokenizer
from meshserve.traces import ExpertTrace
from meshserve.wafer.synthetic import synthetic_trace


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


@pytest.fixture
def tiny_moe_trace(tmp_path):
    """A trace shaped like the shipped tiny-moe's (4 MoE layers x 8 experts, top-2)."""
    trace = synthetic_trace(
        model="tiny-moe",
        num_layers=4,
        num_experts=8,
        top_k=2,
        tokens_per_step=32,
        steps=40,
        seed=0,
        zipf_exponent=0.8,
    )
    return trace.save(tmp_path / "trace.npz")


def test_small_replay_compares_mappings_and_balancers(tiny_moe_trace, tmp_path):
    rows = replay_small(tiny_moe_trace, tmp_path, min_iterations=100)
    by = {(r["mapping"], r["balancer"]): r for r in rows}
    assert set(by) == {("baseline", "none"), ("er", "none"), ("er", "greedy"), ("er", "ni")}
    assert by[("er", "none")]["a2a_s"] <= by[("baseline", "none")]["a2a_s"]
    assert all(r["iterations"] == 120 for r in rows)  # 40 recorded steps, looped 3 times
    assert (tmp_path / "replay-tiny" / "balance_load_over_time.png").is_file()


def test_scaled_replay_draws_deepseek_v3_from_the_fit(tiny_moe_trace, tmp_path):
    rows, pop, path = replay_scaled(tiny_moe_trace, tmp_path, iterations=3)
    scaled = ExpertTrace.load(path)
    assert scaled.counts.shape == (3, 58, 256) and scaled.source == "fitted:tiny-moe"
    assert pop.zipf_exponent > 0.3
    assert [(r["mapping"], r["balancer"]) for r in rows][-1] == ("her", "ni")
    assert np.isfinite([r["moe_tokens_per_s_per_device"] for r in rows]).all()


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
