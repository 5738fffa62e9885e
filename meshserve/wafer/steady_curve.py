"""ni-eplb's steady state as a curve over decode tokens per device, beside EPLB at two cadences.

Per point (the spec's first model; settings in presets/experiments/balance.yaml, ``curves.ni_steady``):

- ``ni_eplb``: the ladder's ni-eplb rung, its steady max/mean broken down by steady.steady_gap
  (noise floor, + forecast, + planner, + lag = the simulated figure), zero stall;
- ``ni_eplb_balanced``: the same with a balanced dispatch (placement/dispatch.py), broken down too;
- ``eplb_paper``: EPLB re-packing every 10 iterations from a 10-iteration window, every plan applied
  (the paper's cadence; inference waits for each plan's copies);
- ``eplb_vllm``: EPLB at vLLM's defaults (a 1,000-iteration window, a plan every 3,000 steps),
  shortened: one plan from the first ``window_size`` iterations, applied at once (vLLM applies every
  plan), scored on the ``iterations // 2`` iterations after it (the freshest part of its 3,000-step
  life, so the figure is optimistic for EPLB), its stall amortised over ``step_interval`` iterations;
- ``none``: the static layout.

Each reports the steady (second-half) max/mean device load per iteration and the MoE time per
iteration (compute + all-to-all + stall) over the same iterations. ``target_reached_at_tokens_per_device``:
the points where ni-eplb's simulated steady max/mean is within the target with zero stall (per
ni-eplb run kind).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from meshserve.wafer.balance import BalanceConfig, make_balancer, migrations
from meshserve.wafer.balance_setup import BalanceSetup, run_marked, setup_parts
from meshserve.wafer.capacity import NO_FIT
from meshserve.wafer.costs import default_costs
from meshserve.wafer.curves import crossover
from meshserve.wafer.fanout import run_many
from meshserve.wafer.iteration import IterationResult, evaluate, load_ratio
from meshserve.wafer.models import load_model
from meshserve.wafer.plots import save_figure
from meshserve.wafer.steady import steady_gap

TARGET = 1.10  # issue 13: steady max/mean with zero stall
GAP_STEPS = ("floor", "forecast", "planner", "simulated")
OURS = ("ni_eplb", "ni_eplb_balanced")  # run kinds broken down by steady_gap
DISPATCH = {"ni_eplb": "even", "ni_eplb_balanced": "balanced"}


def steady_half(result: IterationResult) -> dict[str, float]:
    """Second-half figures of a run: max/mean per iteration, MoE ms and stall ms per iteration."""
    half = result.steady
    return {
        "max_over_mean": result.steady_max_over_mean,
        "moe_ms_per_iteration": float(result.moe_time_s[half].mean() * 1e3),
        "stall_ms_per_iteration": float(result.stall_s[half].mean() * 1e3),
        "plans": len(result.plans),
    }


def ours_point(setup: BalanceSetup) -> dict[str, Any]:
    """ni-eplb's run and its steady_gap columns (per iteration), with its steady half."""
    result = run_marked(setup)
    gap = steady_gap(setup, result)
    out = {k: gap[k]["per_iteration"] for k in GAP_STEPS if k in gap}
    out["time_over_even"] = gap.get("simulated", {}).get("time_over_even")
    return {**out, **steady_half(result)}


def plan_once(setup: BalanceSetup) -> dict[str, Any]:
    """EPLB at a long window, shortened (module docstring): one plan, scored on ``iterations // 2``."""
    window, scored = setup.config.window_size, max(setup.iterations // 2, 1)
    p = setup_parts(dataclasses.replace(setup, iterations=window + scored))
    balancer = make_balancer(setup.balancer, setup.config, p.comm.hops, p.redundant, p.planner_cost)
    counts = p.trace.counts
    history = counts[:window].mean(axis=0)
    target = setup.config.applied(balancer.plan(history, p.base, p.base), history)
    moves = migrations(p.base, target, p.comm.hops)
    stall = p.comm.transfer_time(moves.src, moves.dst, np.full(len(moves), p.cost.weight_bytes))
    block = evaluate(counts[window:], target, p.comm, p.cost, setup.config)
    amortised = stall / setup.config.step_interval
    return {
        "max_over_mean": float(load_ratio(block.max_load, block.mean_load).mean()),
        "moe_ms_per_iteration": float((block.compute_s + block.a2a_s).mean() + amortised) * 1e3,
        "stall_ms_per_iteration": amortised * 1e3,
        "stall_ms_per_plan": stall * 1e3,
        "plans": 1,
    }


def _job(job: tuple[str, BalanceSetup]) -> dict[str, Any]:
    kind, setup = job
    if kind in OURS:
        return ours_point(setup)
    if kind == "eplb_vllm":
        return plan_once(setup)
    return steady_half(run_marked(setup))


def _job_size(job: tuple[str, BalanceSetup]) -> float:
    """A job's rough cost: its tokens, twice for a run broken down by steady_gap (it re-plans)."""
    kind, setup = job
    return setup.tokens_per_device * (2 if kind in OURS else 1)


def ni_steady_curve(
    spec: dict, config: BalanceConfig, progress: bool = True, executor: str = "local"
) -> dict[str, Any]:
    """The curve of the module docstring for ``spec`` (load_spec(); its ladder's rungs name the runs)."""
    c, model = spec["curves"]["ni_steady"], spec["models"][0]
    rungs = {r.label: r for r in [*spec["ladder"], *spec["references"]]}
    iterations = min(spec["iterations"], c["iterations"])
    jobs = []
    for tokens in c["tokens_per_device"]:
        for kind, label in c["runs"].items():
            rung = rungs[label]
            jobs.append(
                (
                    kind,
                    BalanceSetup(
                        model=model,
                        hardware=rung.hardware,
                        mapping=rung.mapping,
                        balancer=rung.balancer,
                        # the balanced runs level with a free solve: what levelling saves, in
                        # time; the break-even (dispatch_break_even) says which solve still pays
                        config=dataclasses.replace(rung.balance_config(config), dispatch_solve_us=0.0)
                        if kind == "ni_eplb_balanced"
                        else rung.balance_config(config),
                        tp=spec["tp"],
                        tokens_per_device=tokens,
                        iterations=iterations,
                        scenario=spec["scenario"],
                        seed=spec["seed"],
                        costs=spec.get("costs", default_costs()),
                    ),
                )
            )
    for _, setup in jobs:  # bad input fails before any long run
        setup.check()
    results = iter(run_many(_job, jobs, executor, progress, "ni steady curve", size=_job_size))
    fit = {s.tokens_per_device: s.fit() for _, s in jobs if s.hardware == jobs[0][1].hardware}
    points = [
        {
            "tokens_per_device": t,
            **{kind: next(results) for kind in c["runs"]},
            "fits_memory": fit[t].fits or not jobs[0][1].costs.check_capacity,
            "memory_need_gb": fit[t].need / 1e9,
        }
        for t in c["tokens_per_device"]
    ]
    reached = {
        kind: [
            p["tokens_per_device"]
            for p in points
            if p[kind].get("simulated", np.inf) <= TARGET
            and p[kind]["stall_ms_per_iteration"] == 0
            and p["fits_memory"]
        ]
        for kind in OURS
        if kind in c["runs"]
    }
    balanced = next((s for kind, s in jobs if kind == "ni_eplb_balanced"), None)
    layers = load_model(model).num_moe_layers
    return {
        "model": model,
        "iterations": iterations,
        "num_moe_layers": layers,
        "dispatch_solve_us": None if balanced is None else balanced.config.dispatch_solve_us,
        "break_even": dispatch_break_even(points, layers)
        if balanced is not None and "ni_eplb" in c["runs"]
        else None,
        "target": TARGET,
        "runs": dict(c["runs"]),
        "points": points,
        "target_reached_at_tokens_per_device": reached,
    }


SOLVE_SWEEP_US = (0.0, 10.0, 25.0, 50.0, 100.0)  # dispatch_solve_us values the break-even is printed for


def dispatch_break_even(points: list[dict], layers: int) -> dict:
    """What the balanced dispatch saves per MoE layer, in time, and where its solve stops paying.

    saving_us[i]: (even dispatch's - balanced dispatch's) steady MoE time per iteration / layers,
    the balanced runs levelling with a free solve (ni_steady_curve runs them so). A solve of s us,
    once per layer, pays where saving_us > s (at most: a plan made knowing the solve's price may
    keep fewer replicas); ``tokens_per_device[s]`` is the batch where it starts to (log-linear
    between points; None when it never does, or the first point already does).
    """
    tokens = [p["tokens_per_device"] for p in points]
    saving = [
        (p["ni_eplb"]["moe_ms_per_iteration"] - p["ni_eplb_balanced"]["moe_ms_per_iteration"]) * 1e3 / layers
        for p in points
    ]
    even = {}
    for solve in SOLVE_SWEEP_US:
        net = np.asarray(saving) - solve
        even[solve] = crossover(tokens, net.tolist()) if len(tokens) > 1 else None
    return {"saving_us_per_layer": saving, "tokens_per_device": {str(k): v for k, v in even.items()}}


def break_even_text(saving_us: list[float], solve_us: float, tokens: float | None) -> str:
    """One break-even as words: from which batch a solve of ``solve_us`` pays, or everywhere / nowhere."""
    if tokens is not None:
        return f"pays from {tokens:.0f} tokens/device"
    return "pays at every batch in range" if min(saving_us, default=0.0) > solve_us else "never pays in range"


def print_ni_steady_curve(curve: dict, console: Any) -> None:
    """One row per point: ni-eplb's four steady_gap columns, then each baseline's max/mean and times."""
    from rich.table import Table

    table = Table(
        title=f"{curve['model']}: steady max/mean device load per iteration over tokens per device "
        f"({curve['iterations']} iterations; second half); MoE ms per iteration incl. stall"
    )
    ours = [k for k in OURS if k in curve["runs"]]
    cols = [
        "tokens/device",
        "dispatch",
        "floor",
        "+ forecast",
        "+ planner",
        "ni-eplb (simulated)",
        "EPLB paper",
        "EPLB vLLM",
        "none",
        "MoE ms: ni-eplb",
        "EPLB paper (stall)",
        "EPLB vLLM (stall)",
        "none",
    ]
    for col in cols:
        table.add_column(col, justify="right")
    for p in curve["points"]:
        for kind in ours:
            first = kind == ours[0]  # the baselines once per point
            balance = [f"{p[k]['max_over_mean']:.3f}" for k in ("eplb_paper", "eplb_vllm", "none")]
            times = [
                f"{p[k]['moe_ms_per_iteration']:.2f} ({p[k]['stall_ms_per_iteration']:.2f})"
                for k in ("eplb_paper", "eplb_vllm")
            ] + [f"{p['none']['moe_ms_per_iteration']:.2f}"]
            mark = "" if p.get("fits_memory", True) else NO_FIT
            table.add_row(
                f"{p['tokens_per_device']}{mark}" if first else "",
                DISPATCH[kind],
                *(_num(p[kind].get(k)) for k in GAP_STEPS),
                *(balance if first else [""] * 3),
                f"{p[kind]['moe_ms_per_iteration']:.2f}",
                *(times if first else [""] * 3),
            )
    console.print(table)
    unfit = [p for p in curve["points"] if not p.get("fits_memory", True)]
    if unfit:
        needs = ", ".join(f"{p['tokens_per_device']}: {p['memory_need_gb']:.0f} GB" for p in unfit)
        console.print(f"  {NO_FIT.strip()}: weights + replicas + KV per die exceed its HBM ({needs})")
    even = curve.get("break_even")
    if even is not None:
        saved = ", ".join(
            f"{p['tokens_per_device']}: {us:+.1f} us"
            for p, us in zip(curve["points"], even["saving_us_per_layer"], strict=True)
        )
        console.print(f"  balanced dispatch saves per MoE layer (free solve), by tokens/device: {saved}")
        where = ", ".join(
            f"{float(us):g} us: {break_even_text(even['saving_us_per_layer'], float(us), t)}"
            for us, t in even["tokens_per_device"].items()
        )
        console.print(f"  break-even by dispatch_solve_us: {where}")
    for kind, reached in curve["target_reached_at_tokens_per_device"].items():
        where = ", ".join(f"{t} tokens/device" for t in reached) if reached else "no point of the curve"
        console.print(
            f"  ni-eplb ({DISPATCH[kind]} dispatch) steady max/mean <= {curve['target']:.2f} "
            f"with zero stall at: {where}"
        )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def ni_steady_png(curve: dict, out: str | Path) -> Path:
    """Left: steady max/mean against tokens per device; right: MoE time per iteration over none's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p["tokens_per_device"] for p in curve["points"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))

    def over_none(kind: str) -> list[float]:
        return [p[kind]["moe_ms_per_iteration"] / p["none"]["moe_ms_per_iteration"] for p in curve["points"]]

    for kind, color in (("ni_eplb", "tab:green"), ("ni_eplb_balanced", "tab:blue")):
        if kind not in curve["runs"]:
            continue
        for k, style, marker in zip(GAP_STEPS, (":", "-.", "--", "-"), "v^Do", strict=True):
            left.plot(
                x,
                [p[kind].get(k, np.nan) for p in curve["points"]],
                ls=style,
                marker=marker,
                color=color,
                label=f"ni-eplb, {DISPATCH[kind]} dispatch: {k}",
            )
        right.plot(x, over_none(kind), marker="o", color=color, label=f"ni-eplb, {DISPATCH[kind]} dispatch")
    for k, color in (("eplb_paper", "tab:red"), ("eplb_vllm", "tab:purple")):
        left.plot(x, [p[k]["max_over_mean"] for p in curve["points"]], marker="s", color=color, label=k)
        right.plot(x, over_none(k), marker="s", color=color, label=f"{k} (stall included)")
    left.axhline(curve["target"], color="black", lw=0.8, ls="--", label=f"target {curve['target']:.2f}")
    unfit = [p["tokens_per_device"] for p in curve["points"] if not p.get("fits_memory", True)]
    for ax in (left, right) if unfit else ():  # grey from the first point that exceeds HBM
        ax.axvspan(min(unfit), max(x), color="grey", alpha=0.2, label="does not fit in HBM")
    right.axhline(1.0, color="black", lw=0.8)
    left.set_ylabel("steady max/mean device load (per iteration)")
    right.set_ylabel("MoE time per iteration / static layout's")
    for ax in (left, right):
        if x:  # a curve without points (tests) draws empty axes
            ax.set_xscale("log", base=2)
        ax.set_xlabel("decode tokens per device")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{curve['model']}: balance in steady state ({curve['iterations']} iterations, second half)")
    fig.tight_layout()
    return save_figure(fig, out)
