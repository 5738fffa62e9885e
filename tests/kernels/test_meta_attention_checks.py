"""The native Meta-Attention op bounds-checks its Task-Table and block tables: a bad table fails loudly,
naming what is out of range, instead of reading another request's KV (or memory past the cache)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meshserve.engine.runner import batch_metadata
from meshserve.kernels import native
from meshserve.kernels.attention_tiles import COL, TileSizes, plan_tasks
from meshserve.kernels.meta_attention_native import meta_attention
from meshserve.models.batch import PAD_BLOCK

BS, KV_HEADS, HEADS, DIM = 4, 2, 4, 16


@pytest.fixture(autouse=True, scope="module")
def native_op():
    if not native.load():
        pytest.fail(f"native kernels missing: run `{native.BUILD_COMMAND}` (make test does)")


def step():
    """Two sequences as the engine's runner builds them: a decode of a 3-token sequence (one block, its
    table row padded) and a 5-token prefill after 6 cached tokens (three blocks); 8 blocks in the cache."""
    tables = [[5], [2, 7, 0]]
    meta = batch_metadata(np.array([2, 6]), np.array([1, 5]), np.array([1, 1]), tables, BS)
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 8, BS, KV_HEADS, DIM, generator=gen)
    q, k, v = (torch.randn(meta.num_tokens, n, DIM, generator=gen) for n in (HEADS, KV_HEADS, KV_HEADS))
    table = plan_tasks(meta, HEADS, KV_HEADS, TileSizes(16, 8, 64), num_threads=2)
    return table, cache, q, k, v


def test_runner_pads_block_tables_with_no_block():
    table, *_ = step()
    assert table.block_tables[0].tolist() == [5, PAD_BLOCK, PAD_BLOCK]


def test_a_good_table_runs():
    table, cache, q, k, v = step()
    assert torch.isfinite(meta_attention(q, k, v, cache, table, 0.25)).all()


def _task_of_seq(table, seq: int) -> int:
    return int((table.tasks[:, COL["seq"]] == seq).nonzero()[0, 0])


def _read_past_blocks(table):  # the decode's range runs into its padding: once block 0, another request's
    table.tasks[_task_of_seq(table, 0), COL["kv_hi"]] = 3 * BS


def _bad_block_id(table):
    table.block_tables[1, 1] = 8  # one past the cache


def _bad_seq(table):
    table.tasks[0, COL["seq"]] = 2


def _bad_head(table):
    table.tasks[0, COL["kv_head"]] = KV_HEADS


def _bad_rows(table):
    table.tasks[_task_of_seq(table, 1), COL["q_rows"]] = 7  # 6 tokens in the step


def _bad_range(table):
    table.tasks[0, COL["kv_lo"]] = int(table.tasks[0, COL["kv_hi"]]) + 1


def _bad_thread_starts(table):
    table.thread_starts[-1] += 1


def _bad_partial(table):
    table.tasks[0, COL["partial"]] = table.partial_rows


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_read_past_blocks, "not a block in"),
        (_bad_block_id, "not a block in"),
        (_bad_seq, "outside the 2 block tables"),
        (_bad_head, "kv head"),
        (_bad_rows, "query rows"),
        (_bad_range, "KV range"),
        (_bad_thread_starts, "thread_starts"),
        (_bad_partial, "partial rows"),
    ],
)
def test_a_bad_table_fails_loudly(corrupt, message):
    table, cache, q, k, v = step()
    corrupt(table)
    with pytest.raises(RuntimeError, match=message):
        meta_attention(q, k, v, cache, table, 0.25)
