"""`meshserve wafer pd`: mixed vs disaggregated deployments as a table, JSON, and a sweep figure."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from meshserve.errors import InputError
from meshserve.wafer.capacity import NO_FIT
from meshserve.wafer.hardware import Hardware, load_hardware
from meshserve.wafer.limits import check_layer
from meshserve.wafer.models import MoEModel, load_model
from meshserve.wafer.pd import DEPLOYS, Mix, PDPoint, deployment, pd_settings

CHOICES = (*DEPLOYS, "both")
STYLE = {"mixed": "-", "disagg": "--"}


def points(
    hw: Hardware, mo: MoEModel, mix: Mix, deploy: str, prefill_dies: int | None, **kw
) -> list[PDPoint]:
    """The asked deployments at one mix (both: mixed, then disagg)."""
    if deploy not in CHOICES:
        raise InputError("deploy", f"unknown {deploy!r}; allowed: {', '.join(CHOICES)}")
    kinds = DEPLOYS if deploy == "both" else (deploy,)
    return [
        deployment(hw, mo, mix, deploy=k, prefill_dies=prefill_dies if k == "disagg" else None, **kw)
        for k in kinds
    ]


def sweep(platforms: list[Hardware], mo: MoEModel, mixes: tuple[Mix, ...], **kw) -> list[PDPoint]:
    """Mixed and disagg (its best split) for every mix on every platform."""
    return [p for hw in platforms for mix in mixes for p in points(hw, mo, mix, "both", None, **kw)]


def print_points(rows: list[PDPoint], console: Console, title: str) -> None:
    table = Table(title=title)
    columns = (
        "platform",
        "mix P/O",
        "deploy",
        "P:D dies",
        "B/die",
        "TTFT ms",
        "TPOT ms",
        "prefill it. ms",
        "tok/s/die",
        "req/s",
        "bound",
        "KV MB/req",
        "KV move ms (worst)",
        "link util (KV)",
    )
    for col in columns:
        table.add_column(
            col, justify="left" if col in ("platform", "mix P/O", "deploy", "bound") else "right"
        )
    for p in rows:
        split = "all" if p.deploy == "mixed" else f"{p.prefill_dies}:{p.decode_dies}"
        move = (
            "-" if p.deploy == "mixed" else f"{p.kv_transfer_s * 1e3:.3f} ({p.kv_transfer_worst_s * 1e3:.3f})"
        )
        table.add_row(
            p.hardware,
            p.mix.label,
            p.deploy,
            split,
            f"{p.tokens_per_device:.3g}",
            f"{p.ttft_s * 1e3:.1f}",
            f"{p.tpot_s * 1e3:.2f}",
            f"{p.prefill_step_s * 1e3:.1f}",
            f"{p.output_tokens_per_s_per_die:.0f}" + ("" if p.fits else NO_FIT),
            f"{p.requests_per_s:.1f}",
            p.bound,
            f"{p.kv_wire_bytes_per_request / 1e6:.1f}",
            move,
            f"{p.link_utilization:.2f} ({p.kv_link_utilization:.3f})",
        )
    console.print(table)


def pd_png(rows: list[PDPoint], path: str | Path, title: str) -> Path:
    """Throughput per die, TPOT and TTFT over the mixes: a line per platform and deployment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meshserve.wafer.plots import save_figure

    mixes = list(dict.fromkeys(p.mix for p in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 5), layout="constrained")
    panels = (
        ("output tokens/s per die", lambda p: p.output_tokens_per_s_per_die, False),
        ("TPOT (ms)", lambda p: p.tpot_s * 1e3, True),
        ("TTFT (ms)", lambda p: p.ttft_s * 1e3, True),
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    platforms = list(dict.fromkeys(p.hardware for p in rows))
    for ax, (label, value, log) in zip(axes, panels, strict=True):
        for i, hw in enumerate(platforms):
            for deploy in DEPLOYS:
                line = [p for p in rows if p.hardware == hw and p.deploy == deploy]
                x = [mixes.index(p.mix) for p in line]
                y = [value(p) for p in line]
                ax.plot(x, y, STYLE[deploy], marker="o", color=colours[i], label=f"{hw} {deploy}")
                bad = [(xi, yi) for xi, yi, p in zip(x, y, line, strict=True) if not p.fits]
                if bad:
                    ax.scatter(*zip(*bad, strict=True), marker="x", s=90, color="black", zorder=3)
                if deploy == "disagg" and label.startswith("output"):
                    for xi, yi, p in zip(x, y, line, strict=True):
                        ax.annotate(
                            f"{p.prefill_dies}:{p.decode_dies}",
                            (xi, yi),
                            fontsize=7,
                            color=colours[i],
                            textcoords="offset points",
                            xytext=(3, -10),
                        )
        ax.set_xticks(range(len(mixes)), [m.label for m in mixes], rotation=30)
        ax.set_title(label)
        ax.set_yscale("log" if log else "linear")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.supxlabel("mean prompt / output tokens per request (prompt-heavy to decode-heavy)")
    fig.suptitle(
        f"{title}\nlabels: prefill:decode dies of disagg's best split; x: does not fit the dies' HBM"
    )
    return save_figure(fig, path)


def run_pd(
    hardware: str,
    model: str,
    mix: Mix,
    deploy: str,
    prefill_dies: int | None,
    *,
    tp: int,
    mapping: str,
    tokens_per_device: float,
    time_model: str,
    tpot_slo_s: float | None = None,
    as_json: bool = False,
    plot: str | None = None,
) -> None:
    """Print the asked deployments at one mix; with ``plot``, also sweep presets/pd.yaml's mixes."""
    hw, mo = load_hardware(hardware), load_model(model)
    check_layer(hw, mo.routed_experts)
    kw = {"tp": tp, "mapping": mapping, "tokens_per_device": tokens_per_device, "time_model": time_model}
    kw["tpot_slo_s"] = tpot_slo_s
    rows = points(hw, mo, mix, deploy, prefill_dies, **kw)
    batch = (
        f"{tokens_per_device:g} decode tokens/die"
        if tpot_slo_s is None
        else f"the most decode tokens/die (<= {tokens_per_device:g}) with TPOT <= {tpot_slo_s * 1e3:g} ms"
    )
    title = f"{mo.name}, TP={tp}, {mapping} mapping, {batch}, {time_model} model"
    swept: list[PDPoint] = []
    if plot is not None:
        settings = pd_settings()
        others = [load_hardware(h) for h in settings.compare_on if h != hw.name]
        swept = sweep([hw, *others], mo, settings.mixes, **kw)
        pd_png(swept, plot, title)
    if as_json:
        out = {"points": [p.summary() for p in rows], "sweep": [p.summary() for p in swept]}
        print(json.dumps(out, indent=1))
        return
    console = Console(width=max(Console().width, 160))
    print_points(rows, console, f"Mixed vs disaggregated: {title}")
    if swept:
        print_points(swept, console, f"Sweep (disagg at its best split): {title}")
        console.print(f"wrote {plot}")
