"""The planner: Token-Table -> tiles -> Task-Table, largest work first, dealt snake-wise, nothing lost."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.kernels.attention_tiles import COL, MaskKind, TileSizes, plan_tasks, tile_sizes
from tests.kernels.test_meta_attention import build_batch

SIZES = TileSizes(prefill_rows=8, short_rows=4, min_split_kv=16)


def costs(tasks: torch.Tensor) -> np.ndarray:
    t = tasks.numpy()
    return t[:, COL["q_rows"]] * (t[:, COL["kv_hi"]] - t[:, COL["kv_lo"]])


def test_tiles_mask_kinds_and_stages():
    # A decode over 5 cached tokens, a 20-row prefill chunk over 3 cached, a 3-row verify block.
    meta, _ = build_batch(context=[5, 3, 10], q_lens=[1, 20, 3], block_size=4, seed=0)
    table = plan_tasks(meta, num_heads=2, num_kv_heads=1, sizes=SIZES, num_threads=1)
    t = table.tasks.numpy()
    rows = sorted(
        zip(t[:, COL["q_start"]], t[:, COL["q_rows"]], t[:, COL["kv_hi"]], t[:, COL["mask"]], strict=True)
    )
    assert rows == [
        (0, 1, 6, MaskKind.NONE),  # the decode sees all 6 positions
        (1, 8, 11, MaskKind.CAUSAL),
        (9, 8, 19, MaskKind.CAUSAL),
        (17, 4, 23, MaskKind.CAUSAL),  # 8+8+4 rows
        (21, 3, 13, MaskKind.CAUSAL),  # the verify block: one tile, causal (sequence verify)
    ]


def test_sliding_window_narrows_the_kv_range_and_marks_the_tile():
    meta, _ = build_batch(context=[40, 2], q_lens=[1, 6], block_size=4, seed=0)
    table = plan_tasks(meta, 2, 1, SIZES, num_threads=1, window=4)
    t = {int(r[COL["q_start"]]): r for r in table.tasks.numpy()}
    assert (t[0][COL["kv_lo"]], t[0][COL["kv_hi"]], t[0][COL["mask"]]) == (37, 41, MaskKind.NONE)
    assert (t[1][COL["kv_lo"]], t[1][COL["kv_hi"]], t[1][COL["mask"]]) == (0, 8, MaskKind.SLIDING)


@settings(max_examples=40, deadline=None)
@given(
    seqs=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 30)), min_size=1, max_size=8),
    kv_heads=st.sampled_from([1, 2, 4]),
    threads=st.integers(1, 4),
)
def test_task_table_covers_every_tile_and_head_once_sorted_and_dealt_snake_wise(seqs, kv_heads, threads):
    meta, _ = build_batch([c for c, _ in seqs], [q for _, q in seqs], block_size=4, seed=1)
    table = plan_tasks(meta, 2 * kv_heads, kv_heads, SIZES, threads)
    t, starts = table.tasks.numpy(), table.thread_starts.numpy()

    # Every query row x KV head x causal KV position is covered exactly once (split parts tile the range).
    covered = np.zeros((meta.num_tokens, kv_heads, int(meta.seq_lens.max())), dtype=int)
    for row in t:
        rows = slice(row[COL["q_start"]], row[COL["q_start"]] + row[COL["q_rows"]])
        covered[rows, row[COL["kv_head"]], row[COL["kv_lo"]] : row[COL["kv_hi"]]] += 1
    last_pos = meta.positions.numpy()
    for tok in range(meta.num_tokens):
        assert (covered[tok, :, : last_pos[tok] + 1] == 1).all()

    # Dealt snake-wise: the i-th largest task goes to thread i % T on even laps, T - 1 - i % T on odd ones.
    sorted_costs = np.sort(costs(table.tasks))[::-1]
    lap, pos = np.arange(len(t)) // threads, np.arange(len(t)) % threads
    dealt = np.where(lap % 2 == 0, pos, threads - 1 - pos)
    for w in range(threads):
        assert sorted(costs(table.tasks[starts[w] : starts[w + 1]])) == sorted(sorted_costs[dealt == w])
    # Within a thread row, largest first.
    for w in range(threads):
        c = costs(table.tasks[starts[w] : starts[w + 1]])
        assert (np.diff(c) <= 0).all()


def test_shipped_profile_gives_tile_sizes():
    sizes = tile_sizes(64, torch.bfloat16)
    assert sizes.prefill_rows >= 1 and sizes.short_rows >= 1 and sizes.min_split_kv >= 1


@settings(max_examples=40, deadline=None)
@given(
    seqs=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), min_size=1, max_size=10),
    kv_heads=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 3]),
    threads=st.integers(1, 5),
    window=st.sampled_from([None, 5, 64]),
)
def test_native_planner_builds_the_numpy_planners_table(seqs, kv_heads, group, threads, window):
    from meshserve.kernels import native
    from meshserve.kernels.attention_tiles import plan_tasks_native

    assert native.load(), f"native kernels missing: run `{native.BUILD_COMMAND}`"
    meta, _ = build_batch([c for c, _ in seqs], [q for _, q in seqs], block_size=4, seed=2)
    ours = plan_tasks_native(meta, group * kv_heads, kv_heads, SIZES, threads, window=window)
    oracle = plan_tasks(meta, group * kv_heads, kv_heads, SIZES, threads, window=window)
    for field in ("slot_mapping", "block_tables", "tasks", "thread_starts", "combine", "tree_mask"):
        assert torch.equal(getattr(ours, field), getattr(oracle, field)), field
    assert (ours.partial_rows, ours.num_tokens) == (oracle.partial_rows, oracle.num_tokens)
