"""A quantized engine's expert trace says how many bytes each expert weight holds, and the wafer
simulator replays it with those bytes (expert reads and migrations), not the preset's bfloat16 ones."""

from __future__ import annotations

import numpy as np
import pytest

from meshserve.engine import LLM, SamplingParams
from meshserve.traces import ExpertTrace
from meshserve.wafer.balance_setup import BalanceSetup, setup_parts
from meshserve.wafer.models import load_model as load_preset


@pytest.mark.parametrize(("method", "low", "high"), [("int8", 1.0, 1.25), ("int4", 0.5, 0.75)])
def test_a_quantized_engine_records_its_expert_bytes(method, low, high, tiny_model_dir, tmp_path):
    trace_file = tmp_path / "trace.npz"
    path = tiny_model_dir("mixtral")
    with LLM(
        str(path), quantization=method, record_expert_trace=str(trace_file), max_num_batched_tokens=64
    ) as llm:
        llm.generate([[1, *range(10, 30)]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    recorded = ExpertTrace.load(trace_file).meta["expert_weight_bytes"]
    assert low < recorded < high  # the packed bits plus their scales (and zeros), per weight


def test_a_float_engine_records_no_expert_bytes(tiny_model_dir, tmp_path):
    trace_file = tmp_path / "trace.npz"
    with LLM(str(tiny_model_dir("mixtral")), record_expert_trace=str(trace_file)) as llm:
        llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert "expert_weight_bytes" not in ExpertTrace.load(trace_file).meta


def test_the_simulator_replays_a_quantized_trace_with_its_bytes(tmp_path):
    setup = BalanceSetup(iterations=2)
    model = load_preset(setup.model)
    counts = np.ones((2, model.num_moe_layers, model.routed_experts), dtype=np.int64) * model.top_k
    trace_file = tmp_path / "int4.npz"
    ExpertTrace(counts, model.name, model.top_k, "engine", {"expert_weight_bytes": 0.5625}).save(trace_file)
    replayed = BalanceSetup(iterations=2, trace=str(trace_file))
    assert replayed.weight_bytes() == 0.5625
    bf16 = setup_parts(setup).cost.weight_bytes
    assert setup_parts(replayed).cost.weight_bytes == pytest.approx(bf16 * 0.5625 / model.bytes_per_element)
    # an explicit setting still wins over what the trace recorded
    assert BalanceSetup(iterations=2, trace=str(trace_file), expert_weight_bytes=1.0).weight_bytes() == 1.0
