"""The demo's wafer half: replay the engine's expert-load trace on a small mesh, and - fitted and scaled
up - as a DeepSeek-V3-sized trace on 4 wafers of 8x8, comparing mappings (ER) and balancers (NI).

This file reads the trace file only (meshserve/traces.py, the bridge); it never touches the engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.progress import Progress

from meshserve.assets import TINY_MOE_WAFER, WSC_2X4
from meshserve.traces import ExpertTrace
from meshserve.wafer.balance_setup import BalanceSetup, run_setup
from meshserve.wafer.iteration import IterationResult
from meshserve.wafer.models import load_model
from meshserve.wafer.reproduce_balance import plot_load_traces
from meshserve.wafer.synthetic import Popularity
from meshserve.wafer.trace_fit import scaled_trace

# (mapping, balancer) rungs; the mesh's own mappings: ER on one wafer, hierarchical ER on several.
SMALL_RUNGS = (("baseline", "none"), ("er", "none"), ("er", "greedy"), ("er", "ni"))
LARGE_RUNGS = (("baseline", "none"), ("er", "none"), ("her", "none"), ("her", "greedy"), ("her", "ni"))
LARGE_MODEL, LARGE_HARDWARE, LARGE_TP, LARGE_TOKENS_PER_DEVICE = "deepseek-v3", "wsc-4x8x8", 4, 64


def run_rungs(label: str, rungs: tuple[tuple[str, str], ...], out: Path, **setup: object) -> list[dict]:
    """One iteration-level simulation per rung; rows for the table; the load-over-time plot to out/."""
    out.mkdir(parents=True, exist_ok=True)
    rows, by_balancer = [], {}
    with Progress(transient=True) as bar:
        task = bar.add_task(f"replay {label}", total=len(rungs))
        for mapping, balancer in rungs:
            result: IterationResult = run_setup(BalanceSetup(mapping=mapping, balancer=balancer, **setup))
            rows.append({"mapping": mapping, "balancer": balancer, **result.summary()})
            if mapping == rungs[-1][0]:
                by_balancer[balancer] = result
            bar.advance(task)
    plot = plot_load_traces(by_balancer, str(setup["model"]), str(setup["hardware"]), out)
    return [{**r, "plot": str(plot)} for r in rows]


def replay_small(trace_path: Path, out: Path, min_iterations: int = 200) -> list[dict]:
    """The recorded trace itself on a 2x4 mesh (one die per expert of the tiny MoE), TP=2.

    A short recording is played in a loop up to min_iterations, so the balancers have time to act.
    """
    trace = ExpertTrace.load(trace_path)
    if trace.num_steps < min_iterations:
        loops = -(-min_iterations // trace.num_steps)
        meta = {**trace.meta, "looped_from_steps": trace.num_steps}
        looped = np.tile(trace.counts, (loops, 1, 1))
        trace = ExpertTrace(looped, trace.model, trace.top_k, trace.source, meta)
        trace_path = trace.save(out / "expert_trace_looped.npz")
    tokens_per_device = max(1, round(float(trace.tokens_per_step().mean()) / 8))
    return run_rungs(
        "tiny-moe on wsc-2x4",
        SMALL_RUNGS,
        out / "replay-tiny",
        model=str(TINY_MOE_WAFER),
        hardware=str(WSC_2X4),
        tp=2,
        tokens_per_device=tokens_per_device,
        iterations=trace.num_steps,
        trace=str(trace_path),
    )


def replay_scaled(
    trace_path: Path, out: Path, iterations: int = 100, seed: int = 0
) -> tuple[list[dict], Popularity, Path]:
    """Fit the recorded trace's skew and drift, draw a DeepSeek-V3-sized trace from it, replay that."""
    model = load_model(LARGE_MODEL)
    devices = 4 * 8 * 8
    scaled, pop = scaled_trace(
        ExpertTrace.load(trace_path),
        model=LARGE_MODEL,
        num_layers=model.num_moe_layers,
        num_experts=model.routed_experts,
        top_k=model.top_k,
        tokens_per_step=LARGE_TOKENS_PER_DEVICE * devices,
        steps=iterations,
        seed=seed,
    )
    path = scaled.save(out / "expert_trace_deepseek_v3_fitted.npz")
    rows = run_rungs(
        f"{LARGE_MODEL} on {LARGE_HARDWARE}",
        LARGE_RUNGS,
        out / "replay-deepseek-v3",
        model=LARGE_MODEL,
        hardware=LARGE_HARDWARE,
        tp=LARGE_TP,
        tokens_per_device=LARGE_TOKENS_PER_DEVICE,
        iterations=iterations,
        trace=str(path),
    )
    return rows, pop, path
