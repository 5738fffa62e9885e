"""The demo's wafer half: replay the engine's expert-load trace as it was recorded (the shipped model's own
routing shape: 3 MoE layers x 64 experts, top-8) on two meshes, comparing mappings (ER) and balancers (NI):
wsc-2x4, one expert group (8 experts) per die, and wsc-8x8, one expert per die.

No fitting or stretching: the preset (meshserve/assets/wafer/tiny-moe.yaml) has the trace's shape, and a
trace of another shape is refused. An old trace of another model (the Mixtral tiny-moe's 8 experts, say) can
still be fitted and drawn at another size with `meshserve.wafer.trace_fit.scaled_trace` (docs/wafer.md).
This file reads the trace file only (meshserve/traces.py, the bridge); it never touches the engine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from rich.progress import Progress

from meshserve.assets import TINY_MOE_WAFER, WSC_2X4
from meshserve.errors import require
from meshserve.traces import ExpertTrace
from meshserve.wafer.balance_setup import BalanceSetup, run_setup
from meshserve.wafer.iteration import IterationResult
from meshserve.wafer.models import load_model
from meshserve.wafer.reproduce_balance import plot_load_traces

# (mapping, balancer) rungs: each mesh is one wafer, so ER is its own mapping.
RUNGS = (("baseline", "none"), ("er", "none"), ("er", "greedy"), ("er", "ni"))
# (label, hardware preset, dies, attention TP, what a die holds at the start)
MESHES = (
    ("wsc-2x4", str(WSC_2X4), 8, 2, "one expert group (8 experts) per die, TP=2"),
    ("wsc-8x8", "wsc-8x8", 64, 4, "one expert per die, TP=4"),
)


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


def looped(trace_path: Path, out: Path, min_iterations: int) -> tuple[Path, int]:
    """The trace, played in a loop up to min_iterations steps (so the balancers have time to act)."""
    trace = ExpertTrace.load(trace_path)
    if trace.num_steps >= min_iterations:
        return trace_path, trace.num_steps
    loops = -(-min_iterations // trace.num_steps)
    meta = {**trace.meta, "looped_from_steps": trace.num_steps}
    counts = np.tile(trace.counts, (loops, 1, 1))
    trace = dataclasses.replace(trace, counts=counts, meta=meta)
    return trace.save(out / "expert_trace_looped.npz"), trace.num_steps


def replay_recorded(trace_path: Path, out: Path, min_iterations: int = 200) -> dict[str, list[dict]]:
    """The recorded trace itself on each mesh of MESHES: rows per mesh, plots under out/replay-<mesh>/."""
    model = load_model(str(TINY_MOE_WAFER))
    trace = ExpertTrace.load(trace_path)
    require(
        trace.top_k == model.top_k,
        f"trace {trace_path}",
        f"top-{trace.top_k} routing; the {model.name} preset routes top-{model.top_k}",
    )
    path, steps = looped(trace_path, out, min_iterations)
    tokens_per_step = float(ExpertTrace.load(path).tokens_per_step().mean())
    return {
        label: run_rungs(
            f"tiny-moe on {label}",
            RUNGS,
            out / f"replay-{label}",
            model=str(TINY_MOE_WAFER),
            hardware=hardware,
            tp=tp,
            tokens_per_device=max(1, round(tokens_per_step / dies)),
            iterations=steps,
            trace=str(path),
        )
        for label, hardware, dies, tp, _ in MESHES
    }
