"""Roofline of Meta-Attention on recorded race steps: each stage's FLOPs, bytes, achieved rates vs this box's
measured peaks, and how the 2-thread Task-Table splits (benchmarks/kernels.py --sections attention-roofline).

Per stage (decode tiles, short / verify tiles, prefill tiles; each stage's tasks alone, 1 thread):
- FLOPs: the useful ones, 4 * head_dim per visible (query head, KV position) score: Q.K and P.V;
- bytes: what the tasks read from the paged cache (each task its KV range once, K and V, in the model
  dtype) plus its queries and outputs;
- roof: max(FLOPs / FMA peak, bytes / read bandwidth of the level the step's KV fits in). The kernels widen
  bfloat16 to float32 and use float32 FMAs, so the float32 FMA rate is the compute roof in both dtypes.
Peaks come from benchmarks/isa_rate.cpp (FMA) and benchmarks/read_bw.cpp (read bandwidth by buffer size),
compiled and run here. The replay reuses one cache for every layer, so its KV is as hot as the step's
working set allows; in the engine each layer has its own cache (8x the bytes between two visits).

Thread split: the 2-thread plan's op time vs each thread row's tasks run alone (1 thread), and an empty
Task-Table's op time (dispatch plus the parallel region's fork / join).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace

import torch
from kernels import HEAD_DIM, HEADS, KV_HEADS, LAYERS, describe, stage_tables
from probes import fma_gflops, run_probe

from meshserve.kernels.attention_tiles import COL, TaskTable, plan_tasks, tile_sizes
from meshserve.models.batch import BatchMetadata


@dataclass(frozen=True)
class Peaks:
    fma_gflops: float  # float32 FMA, one core
    read_gbs: dict[tuple[int, int], float]  # (threads, buffer bytes) -> GB/s


def measure_peaks() -> Peaks:
    """Compile and run the FMA-rate and read-bandwidth probes (about 20 s)."""
    bw = {
        (int(t), int(b)): float(g)
        for t, b, g in re.findall(r"threads=(\d+) bytes=(\d+) GB/s=([\d.]+)", run_probe("read_bw"))
    }
    return Peaks(fma_gflops(run_probe("isa_rate")), bw)


def level_bandwidth(peaks: Peaks, working_set: int, threads: int = 1) -> tuple[int, float]:
    """The read bandwidth of the smallest probed buffer that holds `working_set` bytes."""
    sizes = sorted(b for t, b in peaks.read_gbs if t == threads)
    size = next((b for b in sizes if b >= working_set), sizes[-1])
    return size, peaks.read_gbs[(threads, size)]


def stage_work(table: TaskTable, elem: int) -> tuple[float, float]:
    """(useful FLOPs, bytes read) of a Task-Table's tasks: visible scores x 4 D per query head; K/V ranges."""
    t = table.tasks.long()
    group = HEADS // KV_HEADS
    rows = t[:, COL["q_rows"]]
    lo, hi, pos0 = t[:, COL["kv_lo"]], t[:, COL["kv_hi"]], t[:, COL["q_pos0"]]
    qi = torch.arange(int(rows.max()) if len(t) else 0)
    qpos = pos0[:, None] + qi[None, :]
    causal = t[:, COL["mask"]] != 0
    window = t[:, COL["window"]]
    end = torch.where(causal[:, None], torch.minimum(hi[:, None], qpos + 1), hi[:, None])
    start = torch.where(
        (window > 0)[:, None], torch.maximum(lo[:, None], qpos - window[:, None] + 1), lo[:, None]
    )
    visible = ((end - start).clamp(min=0) * (qi[None, :] < rows[:, None])).sum()
    flops = 4.0 * HEAD_DIM * group * float(visible)
    kv_bytes = float(((hi - lo) * 2 * HEAD_DIM * elem).sum())
    qo_bytes = float((rows * group * HEAD_DIM * elem * 2).sum())
    return flops, kv_bytes + qo_bytes


def _op(q: torch.Tensor, cache: torch.Tensor, table: TaskTable) -> None:
    torch.ops.meshserve.meta_attention(
        q,
        cache,
        table.block_tables,
        table.tasks,
        table.thread_starts,
        table.combine,
        table.tree_mask,
        HEAD_DIM**-0.5,
        table.partial_rows,
    )


def stage_cpu_ms(
    meta: BatchMetadata, blocks: int, block_size: int, dtype: torch.dtype, repeats: int
) -> dict[str, float]:
    """Best CPU ms per layer of each stage's tasks (1 thread) over LAYERS caches, one per layer as in the
    engine (so the KV is as cold as a forward leaves it). Thread CPU time: other jobs on a shared machine
    do not count, their cache and memory traffic does."""
    gen = torch.Generator().manual_seed(0)
    caches = [
        torch.randn(2, blocks, block_size, KV_HEADS, HEAD_DIM, generator=gen).to(dtype) for _ in range(LAYERS)
    ]
    q = torch.randn(meta.num_tokens, HEADS, HEAD_DIM, generator=gen).to(dtype)
    best = {}
    for name, table in stage_tables(meta, tile_sizes(HEAD_DIM, dtype)).items():

        def layers(table: TaskTable = table) -> None:
            for cache in caches:
                _op(q, cache, table)

        layers()
        runs = []
        for _ in range(repeats):
            start = time.thread_time()
            layers()
            runs.append((time.thread_time() - start) * 1e3 / LAYERS)
        best[name] = min(runs)
    return best


def _best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def thread_split(
    meta: BatchMetadata, blocks: int, block_size: int, dtype: torch.dtype, threads: int, repeats: int
) -> dict[str, float]:
    """The plan's op time at `threads`, each thread row alone at 1 thread, and an empty table's op time."""
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(2, blocks, block_size, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    q = torch.randn(meta.num_tokens, HEADS, HEAD_DIM, generator=gen).to(dtype)
    table = plan_tasks(meta, HEADS, KV_HEADS, tile_sizes(HEAD_DIM, dtype), threads)
    starts = table.thread_starts.tolist()
    no_combine = torch.zeros(0, 5, dtype=torch.int32)
    rows = [
        replace(
            table,
            tasks=table.tasks[a:b].contiguous(),
            thread_starts=torch.tensor([0, b - a]),
            combine=no_combine,
        )
        for a, b in zip(starts, starts[1:], strict=False)
    ]
    empty = replace(
        table,
        tasks=table.tasks[:0].contiguous(),
        thread_starts=torch.zeros(threads + 1, dtype=torch.long),
        combine=no_combine,
    )
    torch.set_num_threads(threads)
    result = {
        "op": _best_ms(lambda: _op(q, cache, table), repeats),
        "empty": _best_ms(lambda: _op(q, cache, empty), repeats),
    }
    torch.set_num_threads(1)
    result["empty_1"] = _best_ms(lambda: _op(q, cache, empty), repeats)
    for i, row in enumerate(rows):
        result[f"row{i}"] = _best_ms(lambda row=row: _op(q, cache, row), repeats)
    return result


@torch.inference_mode()
def roofline_section(
    steps: list[BatchMetadata], blocks: int, block_size: int, dtypes: list[str], repeats: int
) -> None:
    """Print the per-stage roofline of each recorded step, then the 2-thread split."""
    peaks = measure_peaks()
    bw = ", ".join(f"{b >> 10} KiB {g:.1f}" for (t, b), g in sorted(peaks.read_gbs.items()) if t == 1)
    bw2 = ", ".join(f"{b >> 10} KiB {g:.1f}" for (t, b), g in sorted(peaks.read_gbs.items()) if t == 2)
    print(
        f"\n== attention roofline: 1 core, CPU ms per layer (best of {repeats}, {LAYERS} layers' caches); "
        f"float32 FMA peak {peaks.fma_gflops:.0f} GFLOP/s; read GB/s by buffer size, 1 thread: {bw}; "
        f"2 threads together: {bw2} =="
    )
    print(
        f"{'dtype':9s} {'step':52s} {'stage':8s} {'tasks':>5s} {'MFLOP':>8s} {'MB read':>8s} {'ms':>7s} "
        f"{'GFLOP/s':>8s} {'GB/s':>6s} {'roof ms':>8s} {'bound':>7s} {'of roof':>7s}"
    )
    torch.set_num_threads(1)
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        elem = torch.empty(0, dtype=dtype).element_size()
        for meta in steps:
            ms = stage_cpu_ms(meta, blocks, block_size, dtype, repeats)
            working_set = LAYERS * int(meta.seq_lens.long().sum()) * KV_HEADS * 2 * HEAD_DIM * elem
            level, gbs = level_bandwidth(peaks, working_set)
            for name, table in stage_tables(meta, tile_sizes(HEAD_DIM, dtype)).items():
                if len(table.tasks) == 0:
                    continue
                flops, nbytes = stage_work(table, elem)
                compute_ms, memory_ms = flops / peaks.fma_gflops / 1e6, nbytes / gbs / 1e6
                roof = max(compute_ms, memory_ms)
                bound = "compute" if compute_ms > memory_ms else "memory"
                print(
                    f"{dtype_name:9s} {describe(meta):52s} {name:8s} {len(table.tasks):5d} "
                    f"{flops / 1e6:8.1f} {nbytes / 1e6:8.2f} {ms[name]:7.3f} {flops / ms[name] / 1e6:8.1f} "
                    f"{nbytes / ms[name] / 1e6:6.1f} {roof:8.3f} {bound:>7s} {roof / ms[name]:7.0%}"
                )
            print(
                f"{'':9s} {'':52s} KV of {LAYERS} layers {working_set / 2**20:.1f} MiB: read roof at the "
                f"{level >> 10} KiB probe, {gbs:.1f} GB/s"
            )
    print(
        f"\n-- 2-thread split: the op at 2 threads vs each thread row alone (1 thread); an empty "
        f"Task-Table's op (dispatch + fork/join); best of {repeats}, wall ms --"
    )
    print(
        f"{'dtype':9s} {'step':52s} {'2 thr':>7s} {'row 0':>7s} {'row 1':>7s} {'balance':>7s} "
        f"{'speed-up':>8s} {'empty 2':>7s} {'empty 1':>7s}"
    )
    for dtype_name in dtypes:
        for meta in steps:
            r = thread_split(meta, blocks, block_size, getattr(torch, dtype_name), 2, repeats)
            balance = max(r["row0"], r["row1"]) / ((r["row0"] + r["row1"]) / 2)
            print(
                f"{dtype_name:9s} {describe(meta):52s} {r['op']:7.3f} {r['row0']:7.3f} {r['row1']:7.3f} "
                f"{balance:7.2f} {(r['row0'] + r['row1']) / r['op']:8.2f} {r['empty']:7.3f} "
                f"{r['empty_1']:7.3f}"
            )
    print(
        "balance: slower row / mean row (1.00 = even); speed-up: both rows' 1-thread time / the 2-thread "
        "op (2.00 = perfect). When other jobs hold both cores, a woken OpenMP worker waits for the "
        "scheduler's tick (4 ms): 'empty 2' then reads 4-20 ms instead of a few microseconds"
    )
