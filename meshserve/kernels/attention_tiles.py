"""Meta-Attention planner: one step's batch -> Token-Table -> tiles -> Task-Table (XY-Serve sec. 4.2-4.3).

Runs once per forward (numpy, vectorised; all layers with the same window share it):

- Token-Table: one row per stage (sequence with query rows this step): its stage kind (decode, short
  = a verify block or short chunk, prefill chunk), first flat query row, query rows, KV length and the
  tile size its stage takes from the profile (`tile_sizes`).
- Tiles: each stage cut along its query rows into tiles; each tile gets a mask kind (`MaskKind`).
- Task-Table: tiles x KV heads (a task computes all G query heads of one KV head, GQA), long KV ranges
  split into parts when there are fewer big units than threads (a combine step merges the parts), sorted
  by cost = query rows x KV length, largest first, and dealt snake-wise (0,1,..,T-1,T-1,..,0,0,..)
  across the worker threads. The native executor runs thread row t's tasks on worker t in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from meshserve import switches
from meshserve.kernels.cpu import isa_tag

if TYPE_CHECKING:  # kernels stay leaves: they only read the metadata's tensors
    from meshserve.kernels.batch import BatchMetadata

# Column order of the Task-Table; kernels/csrc/meta_attention.cpp's `Col` enum names the same fields.
TASK_COLUMNS = (
    "seq",
    "q_start",
    "q_rows",
    "q_pos0",
    "kv_head",
    "kv_lo",
    "kv_hi",
    "mask",
    "window",
    "tree_off",
    "tree_len",
    "partial",
)
COL = {name: i for i, name in enumerate(TASK_COLUMNS)}
SHIPPED_PROFILE = Path(__file__).parent / "profiles" / "attention.json"


class MaskKind(IntEnum):
    """What a tile masks. Sequence verify is causal (the mask-free path of XY-Serve's Fig. 9)."""

    NONE = 0  # every row sees the tile's whole KV range (decodes, early parts of a split)
    CAUSAL = 1  # prefill chunks and sequence-verify blocks
    SLIDING = 2  # causal, and a row sees only its last `window` positions
    TREE = 3  # causal over the prefix; a specLen x specLen bitmask over the verify block itself


class Stage(IntEnum):
    DECODE = 0
    SHORT = 1  # verify blocks and short chunks: one tile
    PREFILL = 2


@dataclass(frozen=True)
class TileSizes:
    """Query rows per tile for prefill chunks, the longest stage kept as one tile, and the shortest KV
    range worth splitting across threads."""

    prefill_rows: int
    short_rows: int
    min_split_kv: int


def profile_key(head_dim: int, dtype: torch.dtype) -> str:
    return f"{isa_tag()}/{str(dtype).removeprefix('torch.')}/d{head_dim}"


def user_profile_path() -> Path:
    """Where `profile_attention` writes this machine's measured tiles (read before the shipped defaults)."""
    return switches.profile_dir() / "attention.json"


@cache
def tile_sizes(head_dim: int, dtype: torch.dtype) -> TileSizes:
    """Tile sizes for this machine: its measured profile if any, else the shipped entry, else the default."""
    shipped = json.loads(SHIPPED_PROFILE.read_text())
    entries = dict(shipped["entries"])
    user = user_profile_path()
    if user.exists():
        entries.update(json.loads(user.read_text()).get("entries", {}))
    return TileSizes(**entries.get(profile_key(head_dim, dtype), shipped["default"]))


@dataclass
class TaskTable:
    """Everything the native executor reads for one forward (one window)."""

    slot_mapping: torch.Tensor  # int64 [T]
    block_tables: torch.Tensor  # int32 [S, max_blocks]
    tasks: torch.Tensor  # int32 [N, len(TASK_COLUMNS)], grouped by thread row, each row in deal order
    thread_starts: torch.Tensor  # int64 [threads + 1]: thread row t is tasks[starts[t]:starts[t+1]]
    combine: torch.Tensor  # int32 [C, 5]: q_start, q_rows, kv_head, first partial row, parts
    tree_mask: torch.Tensor  # uint8 [bits]: the tree tiles' specLen x specLen masks, row-major
    partial_rows: int
    num_tokens: int


def token_table(meta: BatchMetadata, sizes: TileSizes, tree_seqs: np.ndarray) -> dict[str, np.ndarray]:
    """One row per stage: seq, stage, q_start, q_rows, kv_len, tile (query rows per tile)."""
    qsl = meta.query_start_loc.numpy().astype(np.int64)
    q_lens = np.diff(qsl)
    seq = np.flatnonzero(q_lens > 0)
    q_rows, kv_len = q_lens[seq], meta.seq_lens.numpy().astype(np.int64)[seq]
    short = np.where(q_rows <= sizes.short_rows, Stage.SHORT, Stage.PREFILL)
    stage = np.where(q_rows == 1, Stage.DECODE, short)
    tile = np.where(stage == Stage.PREFILL, sizes.prefill_rows, q_rows)
    tile = np.where(np.isin(seq, tree_seqs), q_rows, tile)  # a tree block stays one tile (its mask is whole)
    return {"seq": seq, "stage": stage, "q_start": qsl[seq], "q_rows": q_rows, "kv_len": kv_len, "tile": tile}


def _segment_index(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each count c, concatenated."""
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


def plan_tasks(
    meta: BatchMetadata,
    num_heads: int,
    num_kv_heads: int,
    sizes: TileSizes,
    num_threads: int,
    window: int | None = None,
    tree_masks: dict[int, torch.Tensor] | None = None,
) -> TaskTable:
    """Build the Task-Table of one forward. tree_masks: seq -> bool [q_len, q_len] tree-verify mask."""
    tree_masks = tree_masks or {}
    tt = token_table(meta, sizes, np.array(sorted(tree_masks), dtype=np.int64))
    group = num_heads // num_kv_heads

    # Tiles: each stage cut into ceil(q_rows / tile) tiles of `tile` query rows (the last one shorter).
    n_tiles = -(-tt["q_rows"] // tt["tile"])
    stage_of = np.repeat(np.arange(len(n_tiles)), n_tiles)
    first = _segment_index(n_tiles) * tt["tile"][stage_of]
    seq, kv_len = tt["seq"][stage_of], tt["kv_len"][stage_of]
    rows = np.minimum(tt["tile"][stage_of], tt["q_rows"][stage_of] - first)
    q_pos0 = kv_len - tt["q_rows"][stage_of] + first
    kv_hi = q_pos0 + rows  # causal: the tile's last row sees up to its own position
    kv_lo = np.zeros_like(kv_hi)
    mask = np.where(rows > 1, MaskKind.CAUSAL, MaskKind.NONE)
    if window:
        kv_lo = np.maximum(0, q_pos0 - window + 1)
        mask = np.where(np.maximum(0, q_pos0 + rows - window) > kv_lo, MaskKind.SLIDING, mask)
    tree_len = np.zeros_like(rows)
    tree_off = np.zeros_like(rows)
    bits = [torch.zeros(1, dtype=torch.uint8)]
    offset = 1
    for s, m in sorted(tree_masks.items()):  # one loop step per tree draft, never per token
        at = np.flatnonzero(seq == s)
        mask[at], tree_len[at], tree_off[at] = MaskKind.TREE, m.shape[0], offset
        bits.append(m.to(torch.uint8).reshape(-1))
        offset += m.numel()

    # Units: tiles x KV heads; then KV splits where a unit is much bigger than a thread's fair share.
    n_t = len(rows)
    tile_of = np.repeat(np.arange(n_t), num_kv_heads)
    head = np.tile(np.arange(num_kv_heads), n_t)
    span = (kv_hi - kv_lo)[tile_of]
    cost = rows[tile_of] * span
    parts = np.ones_like(cost)
    if num_threads > 1 and len(cost):
        share = max(1, cost.sum() // num_threads)
        parts = np.clip(np.minimum(-(-cost // share), span // sizes.min_split_kv), 1, num_threads)
    unit = np.repeat(np.arange(len(cost)), parts)
    part = _segment_index(parts)
    lo = kv_lo[tile_of][unit] + span[unit] * part // parts[unit]
    hi = kv_lo[tile_of][unit] + span[unit] * (part + 1) // parts[unit]
    task_rows = rows[tile_of][unit]
    split = parts[unit] > 1
    row_count = np.where(split, task_rows * group, 0)
    partial = np.where(split, np.cumsum(row_count) - row_count, -1)
    # An early part of a causal/sliding split sees its whole range when the tile's first row does.
    t = tile_of[unit]
    task_mask = np.where((mask[t] == MaskKind.CAUSAL) & (hi <= q_pos0[t] + 1), MaskKind.NONE, mask[t])

    table = np.stack(
        [
            seq[t],
            tt["q_start"][stage_of][t] + first[t],
            task_rows,
            q_pos0[t],
            head[unit],
            lo,
            hi,
            task_mask,
            np.full_like(lo, window or 0),
            tree_off[t],
            tree_len[t],
            partial,
        ],
        axis=1,
    )
    # Task-Table: largest cost first, dealt snake-wise across threads.
    order = np.argsort(-(task_rows * (hi - lo)), kind="stable")
    rank = np.arange(len(order))
    lap, pos = rank // num_threads, rank % num_threads
    thread = np.where(lap % 2 == 0, pos, num_threads - 1 - pos)
    by_thread = order[np.argsort(thread, kind="stable")]
    starts = np.concatenate([[0], np.cumsum(np.bincount(thread, minlength=num_threads))])

    first_part = np.flatnonzero(split & (part == 0))
    combine = np.stack(
        [
            table[first_part, COL["q_start"]],
            task_rows[first_part],
            head[unit][first_part],
            partial[first_part],
            parts[unit][first_part],
        ],
        axis=1,
    ).reshape(-1, 5)
    return TaskTable(
        slot_mapping=meta.slot_mapping.long(),
        block_tables=meta.block_tables.to(torch.int32).contiguous(),
        tasks=torch.from_numpy(np.ascontiguousarray(table[by_thread], dtype=np.int32)),
        thread_starts=torch.from_numpy(starts.astype(np.int64)),
        combine=torch.from_numpy(np.ascontiguousarray(combine, dtype=np.int32)),
        tree_mask=torch.cat(bits),
        partial_rows=int(row_count.sum()),
        num_tokens=meta.num_tokens,
    )


def plan_tasks_native(
    meta: BatchMetadata,
    num_heads: int,
    num_kv_heads: int,
    sizes: TileSizes,
    num_threads: int,
    window: int | None = None,
) -> TaskTable:
    """`plan_tasks` (no tree masks) by the native planner (kernels/csrc/task_table.cpp): the same table in
    microseconds instead of ~80 numpy calls, which matters when the whole forward is a millisecond."""
    tasks, starts, combine, partial_rows = torch.ops.meshserve.plan_tasks(
        meta.query_start_loc,
        meta.seq_lens,
        num_heads,
        num_kv_heads,
        sizes.prefill_rows,
        sizes.short_rows,
        sizes.min_split_kv,
        num_threads,
        window or 0,
    )
    return TaskTable(
        slot_mapping=meta.slot_mapping.long(),
        block_tables=meta.block_tables.to(torch.int32).contiguous(),
        tasks=tasks,
        thread_starts=starts,
        combine=combine,
        tree_mask=torch.zeros(1, dtype=torch.uint8),
        partial_rows=partial_rows,
        num_tokens=meta.num_tokens,
    )
