"""Expert parallelism over quantized experts: dispatch to packed slots and live-migrate them as bytes, with
the single-process quantized engine's greedy tokens throughout."""

from __future__ import annotations

import pytest

from meshserve.engine import LLM
from tests.engine.distributed.helpers import ARGS, SINGLE, serve_until_migrated, tokens


@pytest.mark.parametrize("method", ["int4"])
def test_quantized_experts_dispatch_and_migrate_with_the_single_process_tokens(mixtral, method):
    with LLM(mixtral, quantization=method, **SINGLE) as llm:
        expected = tokens(llm)
    config = {"window_size": 2, "step_interval": 2, "num_redundant_experts": 2, "chunk_bytes": 4096}
    with LLM(
        mixtral,
        quantization=method,
        data_parallel_size=2,
        enable_expert_parallel=True,
        enable_eplb=True,
        eplb_config=config,
        **ARGS,
    ) as llm:
        done = serve_until_migrated(llm, expected)
        assert all(m["bytes"] > 0 and m["copies"] > 0 for m in done)
