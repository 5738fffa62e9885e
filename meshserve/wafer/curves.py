"""Curves instead of single points for `reproduce balance`: where WSC beats NVL72, and when NI pays.

- wsc_vs_nvl72: per-device MoE throughput of the ladder's NI rung (WSC, every technique) over its
  NVL72 rung, against decode tokens per device, for BF16 and FP8 expert weights, plus a sweep of
  the assumed inter-wafer bandwidth; the crossover is where the gain changes sign (interpolated
  in log tokens).
- ni_skew: NI-Balancer's MoE compute gain over the unbalanced rung against the routing skew
  (synthetic Zipf exponent), with the unbalanced run's max/mean device load as the x axis.
Settings: presets/experiments/balance.yaml, ``curves``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from meshserve.wafer.balance import BalanceConfig
from meshserve.wafer.balance_setup import BalanceSetup, run_marked
from meshserve.wafer.capacity import NO_FIT, fits
from meshserve.wafer.costs import default_costs
from meshserve.wafer.fanout import run_many
from meshserve.wafer.plots import save_figure


def _setup(rung, model: str, settings: dict, config: BalanceConfig, **extra: Any) -> BalanceSetup:
    return BalanceSetup(
        model=model,
        hardware=rung.hardware,
        mapping=rung.mapping,
        balancer=rung.balancer,
        config=rung.balance_config(config),
        **{**settings, **extra},
    )


def _summary(setup: BalanceSetup) -> dict:
    return run_marked(setup).summary()


def crossover(tokens: list[float], gain: list[float]) -> float | None:
    """Tokens per device where the gain first changes sign (log-linear interpolation), or None."""
    x, y = np.log(np.asarray(tokens, dtype=np.float64)), np.asarray(gain, dtype=np.float64)
    flips = np.flatnonzero(np.sign(y[1:]) != np.sign(y[:-1]))
    if len(flips) == 0:
        return None
    i = flips[0]
    return float(np.exp(x[i] - y[i] * (x[i + 1] - x[i]) / (y[i + 1] - y[i])))


def wsc_vs_nvl72_curve(
    spec: dict, rungs: dict, settings: dict, config: BalanceConfig, run: Callable[[BalanceSetup], dict]
) -> dict:
    """Gain of WSC (all techniques) over NVL72 per tokens per device, expert weight type and bandwidth."""
    c, model = spec["curves"]["wsc_vs_nvl72"], spec["models"][0]
    gpu, wsc = rungs["gpu"], rungs["ni"]
    points = []
    for dtype, nbytes in c["expert_weight_bytes"].items():
        for tokens in c["tokens_per_device"]:
            point = {**settings, "tokens_per_device": tokens}
            a = run(_setup(gpu, model, point, config, expert_weight_bytes=nbytes))
            b = run(_setup(wsc, model, point, config, expert_weight_bytes=nbytes))
            points.append(
                {
                    "expert_weights": dtype,
                    "tokens_per_device": tokens,
                    "gain": b["moe_tokens_per_s_per_device"] / a["moe_tokens_per_s_per_device"] - 1,
                    "gain_with_reduction": b["moe_and_reduction_tokens_per_s_per_device"]
                    / a["moe_and_reduction_tokens_per_s_per_device"]
                    - 1,
                    "fits_memory": fits(a, b),
                    "memory_need_gb": [r.get("memory_need_gb") for r in (a, b)],  # gpu, wsc
                }
            )
    gpu64 = run(_setup(gpu, model, settings, config))
    links = []
    for gb in c["wafer_link_gb_per_s"]:
        b = run(_setup(wsc, model, settings, config, wafer_link_gb_per_s=gb))
        links.append(
            {
                "wafer_link_gb_per_s": gb,
                "tokens_per_device": settings["tokens_per_device"],
                "gain": b["moe_tokens_per_s_per_device"] / gpu64["moe_tokens_per_s_per_device"] - 1,
                "gain_with_reduction": b["moe_and_reduction_tokens_per_s_per_device"]
                / gpu64["moe_and_reduction_tokens_per_s_per_device"]
                - 1,
                "fits_memory": fits(gpu64, b),
            }
        )
    cross = {}
    for dtype in c["expert_weight_bytes"]:
        mine = [p for p in points if p["expert_weights"] == dtype]
        cross[dtype] = crossover([p["tokens_per_device"] for p in mine], [p["gain"] for p in mine])
    return {
        "model": model,
        "wsc": wsc.label,
        "gpu": gpu.label,
        "iterations": settings["iterations"],
        "points": points,
        "crossover_tokens_per_device": cross,
        "wafer_link": links,
    }


def ni_skew_curve(
    spec: dict, rungs: dict, settings: dict, config: BalanceConfig, run: Callable[[BalanceSetup], dict]
) -> dict:
    """NI-Balancer's compute gain over the unbalanced rung as the routing skew grows."""
    c, model = spec["curves"]["ni_skew"], spec["models"][0]
    points = []
    for zipf in c["zipf_exponent"]:
        plain = run(_setup(rungs["unbalanced"], model, settings, config, zipf_exponent=zipf))
        ni = run(_setup(rungs["ni"], model, settings, config, zipf_exponent=zipf))
        points.append(
            {
                "zipf_exponent": zipf,
                "max_over_mean_load": plain["max_over_mean_load"],
                "ni_max_over_mean_load": ni["max_over_mean_load"],
                "ni_compute_gain": plain["moe_compute_s"] / ni["moe_compute_s"] - 1,
                "fits_memory": fits(plain, ni),
            }
        )
    return {"model": model, "iterations": settings["iterations"], "points": points}


def curves_png(wsc: dict, skew: dict, out: str | Path) -> Path:
    """Two panels: WSC vs NVL72 gain against tokens per device; NI gain against trace skew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for dtype in dict.fromkeys(p["expert_weights"] for p in wsc["points"]):
        mine = [p for p in wsc["points"] if p["expert_weights"] == dtype]
        x = [p["tokens_per_device"] for p in mine]
        left.plot(x, [p["gain"] * 100 for p in mine], marker="o", label=f"{dtype} expert weights")
        bad = [p for p in mine if not p.get("fits_memory", True)]
        if bad:  # a point that does not fit a die's HBM: a red cross over its marker
            left.scatter(
                [p["tokens_per_device"] for p in bad],
                [p["gain"] * 100 for p in bad],
                marker="x",
                s=80,
                color="red",
                zorder=3,
                label="does not fit in HBM" if dtype == mine[0]["expert_weights"] else None,
            )
        left.plot(
            x,
            [p["gain_with_reduction"] * 100 for p in mine],
            marker=".",
            ls="--",
            label=f"{dtype}, attention reduction included",
        )
    left.axhline(0, color="black", lw=0.8)
    left.set_xscale("log", base=2)
    left.set_xlabel("decode tokens per device")
    left.set_ylabel("per-device MoE throughput gain (%)")
    left.set_title(f"{wsc['model']}: {wsc['wsc']} vs {wsc['gpu']}", fontsize=9)
    left.legend(fontsize=7)
    xs = [p["max_over_mean_load"] for p in skew["points"]]
    right.plot(xs, [p["ni_compute_gain"] * 100 for p in skew["points"]], marker="o")
    for p in skew["points"]:
        right.annotate(
            f"zipf {p['zipf_exponent']:g}", (p["max_over_mean_load"], p["ni_compute_gain"] * 100), fontsize=7
        )
    right.set_xlabel("max/mean device load without balancing")
    right.set_ylabel("NI-Balancer MoE compute gain (%)")
    right.set_title(f"{skew['model']}: NI-Balancer gain vs trace skew", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def run_curves(
    spec: dict, config: BalanceConfig, progress: bool = True, executor: str = "local"
) -> tuple[dict, dict]:
    """Both curves for the first model of ``spec`` (the ladder's roles name the rungs) on ``executor``."""
    rungs = {
        role: next(r for r in [*spec["ladder"], *spec["references"]] if r.label == label)
        for role, label in spec["roles"].items()
    }
    settings = {k: spec[k] for k in ("tp", "tokens_per_device", "scenario", "seed", "time_model")}
    settings["costs"] = spec.get("costs", default_costs())
    settings["iterations"] = min(spec["iterations"], spec["curves"]["iterations"])
    # list every run first (a dry pass that records the setups), run them all, then build the curves
    wanted: list[BalanceSetup] = []
    placeholder = {
        "moe_tokens_per_s_per_device": 1.0,
        "moe_and_reduction_tokens_per_s_per_device": 1.0,
        "moe_compute_s": 1.0,
        "max_over_mean_load": 1.0,
    }

    def record(setup: BalanceSetup) -> dict:
        wanted.append(setup)
        return dict(placeholder)

    for curve in (wsc_vs_nvl72_curve, ni_skew_curve):
        curve(spec, rungs, settings, config, record)
    unique = list(dict.fromkeys(wanted))
    runs = run_many(_summary, unique, executor, progress, "curves", size=lambda s: s.tokens_per_device)
    done = dict(zip(unique, runs, strict=True))
    return (
        wsc_vs_nvl72_curve(spec, rungs, settings, config, done.__getitem__),
        ni_skew_curve(spec, rungs, settings, config, done.__getitem__),
    )


def print_curves(wsc: dict, skew: dict, console: Any) -> None:
    """The two curves as tables, with the crossover."""
    from rich.table import Table

    kinds = list(dict.fromkeys(p["expert_weights"] for p in wsc["points"]))
    table = Table(
        title=f"{wsc['model']}: {wsc['wsc']} vs {wsc['gpu']}, per-device MoE throughput gain "
        f"({wsc['iterations']} iterations; 'incl.': attention reduction counted)"
    )
    table.add_column("tokens/device", justify="right")
    for k in kinds:
        table.add_column(k, justify="right")
        table.add_column(f"{k} incl.", justify="right")
    for tokens in dict.fromkeys(p["tokens_per_device"] for p in wsc["points"]):
        row = {p["expert_weights"]: p for p in wsc["points"] if p["tokens_per_device"] == tokens}
        table.add_row(
            str(tokens),
            *(
                f"{row[k][g]:+.1%}" + ("" if row[k].get("fits_memory", True) else NO_FIT)
                for k in kinds
                for g in ("gain", "gain_with_reduction")
            ),
        )
    console.print(table)
    if not all(p.get("fits_memory", True) for p in wsc["points"]):
        console.print(f"  {NO_FIT.strip()}: weights + replicas + KV exceed a die's HBM (capacity.py)")
    cross = ", ".join(
        f"{k}: {'none in range' if x is None else f'{x:.0f} tokens/device'}"
        for k, x in wsc["crossover_tokens_per_device"].items()
    )
    console.print(f"  crossover (WSC stops beating NVL72): {cross}")
    links = ", ".join(
        f"{p['wafer_link_gb_per_s']:g} GB/s {p['gain']:+.1%}" + ("" if p.get("fits_memory", True) else NO_FIT)
        for p in wsc["wafer_link"]
    )
    console.print(
        f"  at {wsc['wafer_link'][0]['tokens_per_device']} tokens/device, bf16, by inter-wafer bandwidth: "
        f"{links}"
    )
    table = Table(
        title=f"{skew['model']}: NI-Balancer MoE compute gain vs trace skew ({skew['iterations']} iterations)"
    )
    for col in ("zipf exponent", "max/mean load (no balance)", "max/mean load (NI)", "NI compute gain"):
        table.add_column(col, justify="right")
    for p in skew["points"]:
        table.add_row(
            f"{p['zipf_exponent']:g}",
            f"{p['max_over_mean_load']:.2f}",
            f"{p['ni_max_over_mean_load']:.2f}",
            f"{p['ni_compute_gain']:+.1%}" + ("" if p.get("fits_memory", True) else NO_FIT),
        )
    console.print(table)
