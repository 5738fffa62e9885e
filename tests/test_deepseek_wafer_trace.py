"""The bridge without stretching: a DeepSeek-V3-shaped tiny model (61 layers, the first 3 dense, 256 routed
experts in 8 groups, top-8 from 4 groups) records an expert-load trace that `meshserve wafer sweep` replays
against the `deepseek-v3` preset as it is (no fitting, no scaling)."""

from __future__ import annotations

import csv

import numpy as np
import yaml

from meshserve.engine import LLM, SamplingParams
from meshserve.testing import make_tiny_model, run_cli
from meshserve.traces import ExpertTrace

# DeepSeek-V3's routing and layer shape (config.json), everything else tiny.
V3_SHAPE = {
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "n_shared_experts": 1,
}
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 8,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
}


def test_deepseek_v3_shaped_trace_replays_in_wafer_sweep(tmp_path):
    model = make_tiny_model(tmp_path / "v3", arch="deepseek_v3", stacked_experts=True, **V3_SHAPE, **TINY)
    trace_file = tmp_path / "trace.npz"
    with LLM(str(model), record_expert_trace=str(trace_file), max_num_batched_tokens=64) as llm:
        llm.generate([[1, *range(10, 30)]], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    trace = ExpertTrace.load(trace_file)
    steps = trace.counts.shape[0]
    assert trace.counts.shape == (steps, 58, 256) and trace.top_k == 8 and trace.source == "engine"
    assert (trace.counts.sum(axis=2) == 8 * trace.tokens_per_step()[:, None]).all()
    # A decode step routes one token: its 8 experts lie in at most topk_group = 4 of the 8 groups of 32.
    decode = trace.counts[-1].reshape(58, 8, 32)
    assert trace.tokens_per_step()[-1] == 1 and ((decode.sum(axis=2) > 0).sum(axis=1) <= 4).all()

    spec = {
        "models": ["deepseek-v3"],
        "platforms": ["wsc-4x8x8"],
        "tp": [4],
        "batch": [32],
        "balancers": ["none", "ni"],
        "iterations": steps,
    }
    results = {}
    for name, extra in {"recorded": {"trace": str(trace_file)}, "synthetic": {}}.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**spec, **extra}))
        out = tmp_path / name
        done = run_cli(["wafer", "sweep", str(tmp_path / f"{name}.yaml"), "--out", str(out)])
        assert done.code == 0, done.err
        with open(out / "results.csv") as f:
            results[name] = list(csv.DictReader(f))
    rows = results["recorded"]
    assert [r["balancer"] for r in rows] == ["none", "ni"]
    assert all(r["model"] == "deepseek-v3" and int(r["iterations"]) == steps for r in rows)
    # the recorded loads, not a drawn trace of the same shape, are what the sweep replayed
    recorded, synthetic = (float(results[n][0]["balancedness"]) for n in ("recorded", "synthetic"))
    assert np.isfinite(recorded) and recorded != synthetic
