"""Expert parallelism over quantized experts: dispatch to packed slots and live-migrate them as bytes, with
the single-process quantized engine's greedy tokens throughout, and record the same expert bytes in the
trace (the ranks hold the experts; the front end writes the trace)."""

from __future__ import annotations

import pytest

from meshserve.engine import LLM
from meshserve.traces import ExpertTrace
from tests.engine.distributed.helpers import ARGS, SINGLE, serve_until_migrated, tokens


@pytest.mark.parametrize("method", ["int4"])
def test_quantized_experts_dispatch_and_migrate_with_the_single_process_tokens(mixtral, method, tmp_path):
    single_trace, ep_trace = tmp_path / "single.npz", tmp_path / "ep.npz"
    with LLM(mixtral, quantization=method, record_expert_trace=str(single_trace), **SINGLE) as llm:
        expected = tokens(llm)
    config = {"window_size": 2, "step_interval": 2, "num_redundant_experts": 2, "chunk_bytes": 4096}
    with LLM(
        mixtral,
        quantization=method,
        data_parallel_size=2,
        enable_expert_parallel=True,
        enable_eplb=True,
        eplb_config=config,
        record_expert_trace=str(ep_trace),
        **ARGS,
    ) as llm:
        done = serve_until_migrated(llm, expected)
        assert all(m["bytes"] > 0 and m["copies"] > 0 for m in done)
    recorded = ExpertTrace.load(single_trace).meta["expert_weight_bytes"]
    assert 0.5 < recorded < 0.75  # int4: half a byte plus the group's scale and zero
    assert ExpertTrace.load(ep_trace).meta["expert_weight_bytes"] == recorded
