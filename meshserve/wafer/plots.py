"""Matplotlib figures: link-load heatmaps of a mesh and the reproduce-comm comparison chart.

matplotlib is imported inside the functions so that importing the CLI stays fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meshserve.atomic import atomic_path
from meshserve.errors import InputError
from meshserve.wafer.hardware import Hardware
from meshserve.wafer.mapping import Mapping
from meshserve.wafer.models import MoEModel
from meshserve.wafer.simulate import LayerResult
from meshserve.wafer.topology import Topology, topology_for

COLOURS = {
    "baseline": "#7f7f7f",
    "er": "#1f77b4",
    "er-bal": "#2ca02c",
    "her": "#ff7f0e",
    "her-bal": "#d62728",
    "her-ftd": "#9467bd",
}


def save_figure(fig, path: str | Path, dpi: int = 130) -> Path:
    """Write a figure atomically (temp file + os.replace) as a PNG and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _draw_mesh(ax, topo: Topology, m: Mapping, loads: np.ndarray, title: str):
    """Every directed mesh link as an arrow-lane coloured by its load; dies labelled by TP group."""
    from matplotlib.collections import LineCollection

    mesh = np.flatnonzero(topo.link_kind == "mesh")
    a = topo.coords[topo.link_src[mesh]][:, ::-1] * [1, -1]  # (x, y) = (col, -row)
    b = topo.coords[topo.link_dst[mesh]][:, ::-1] * [1, -1]
    step = b - a
    side = np.stack([step[:, 1], -step[:, 0]], axis=1) * 0.13  # keep the two directions apart
    segments = np.stack([a + 0.22 * step + side, b - 0.22 * step + side], axis=1)
    values = loads[mesh] / 1e6
    lines = LineCollection(segments, array=values, cmap="inferno_r", linewidths=3.2, norm=_norm(values))
    ax.add_collection(lines)
    xy = topo.coords[:, ::-1] * [1, -1]
    small = m.num_devices <= 100
    ax.scatter(
        xy[:, 0],
        xy[:, 1],
        s=140 if small else 30,
        c=m.ftd_of,
        cmap="Pastel1",
        edgecolors="#555555",
        linewidths=0.6,
        zorder=3,
        vmin=0,
        vmax=8,
    )
    if small:
        for d, (x, y) in enumerate(xy):
            ax.text(x, y, str(m.group_of[d]), ha="center", va="center", fontsize=6, zorder=4)
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")
    ax.set_xlim(xy[:, 0].min() - 0.6, xy[:, 0].max() + 0.6)
    ax.set_ylim(xy[:, 1].min() - 0.6, xy[:, 1].max() + 0.6)
    ax.set_xticks([])
    ax.set_yticks([])
    return lines


def _norm(values: np.ndarray):
    from matplotlib.colors import Normalize

    return Normalize(vmin=0.0, vmax=max(float(values.max()), 1e-9))


def heatmap_png(
    hw: Hardware, model: MoEModel, m: Mapping, tokens: float, layer: LayerResult, out: str | Path
) -> Path:
    """Attention-reduction and MoE all-to-all link loads side by side (one colour bar each)."""
    import matplotlib.pyplot as plt

    if hw.kind != "mesh":
        raise InputError("hardware", f"heatmap draws mesh platforms; {hw.name} is a switch platform")
    topo = topology_for(hw)
    fig, axes = plt.subplots(1, 2, figsize=(14, 7) if hw.wafers > 1 else (12, 6))
    phases = [
        ("attention reduction", layer.attention_loads, layer.attention_comm_s),
        ("MoE all-to-all (dispatch + combine)", layer.moe_loads, layer.all_to_all_s),
    ]
    for ax, (name, loads, seconds) in zip(axes, phases, strict=True):
        mesh_max = loads[topo.link_kind == "mesh"].max() / 1e6
        title = f"{name}\n{seconds * 1e6:.1f} us, hottest mesh link {mesh_max:.2f} MB"
        off = loads[np.isin(topo.link_kind, ("wafer-up", "wafer-down"))]
        if off.size:
            title += f"\nhottest off-wafer port {off.max() / 1e6:.2f} MB"
        lines = _draw_mesh(ax, topo, m, loads, title)
        fig.colorbar(lines, ax=ax, shrink=0.8, label="bytes on link (MB)")
    dies = ", number = TP group" if m.num_devices <= 100 else ", one square block per wafer"
    fig.suptitle(
        f"{model.name} on {hw.name}, mapping {m.name}, TP={m.tp}, {tokens:g} tokens/device: link loads "
        f"({layer.time_model} model)\ndies: colour = Full Token Domain{dies}; each link drawn once per "
        "direction (right-hand lane)",
        fontsize=10,
    )
    return save_figure(fig, out)


def comparison_png(result: dict, out: str | Path) -> Path:
    """Per scale: communication per MoE layer of each model under each mapping, stacked as
    all-to-all (solid) + attention reduction (light)."""
    import matplotlib.pyplot as plt

    scales = list(dict.fromkeys(r["hardware"] for r in result["rows"]))
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    cols = 2
    fig, axes = plt.subplots(
        (len(scales) + 1) // cols, cols, figsize=(13, 4.2 * ((len(scales) + 1) // cols)), squeeze=False
    )
    for ax, scale in zip(axes.ravel(), scales, strict=False):
        rows = {r["model"]: r for r in result["rows"] if r["hardware"] == scale}
        kinds = list(rows[models[0]]["mappings"])
        width = 0.8 / len(kinds)
        for i, kind in enumerate(kinds):
            x = np.arange(len(models)) + (i - (len(kinds) - 1) / 2) * width
            a2a = [rows[mo]["mappings"][kind]["all_to_all_us"] for mo in models]
            attn = [rows[mo]["mappings"][kind]["attention_us"] for mo in models]
            ax.bar(x, a2a, width, color=COLOURS[kind], label=f"{kind}: all-to-all")
            ax.bar(
                x,
                attn,
                width,
                bottom=a2a,
                color=COLOURS[kind],
                alpha=0.35,
                label=f"{kind}: attention reduction",
            )
        devices = rows[models[0]]["devices"]
        ax.set_title(f"{scale} ({devices} devices)", fontsize=10)
        ax.set_xticks(np.arange(len(models)), models, fontsize=8)
        ax.set_ylabel("communication per MoE layer (us)")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.ravel()[len(scales) :]:
        ax.axis("off")
    handles, labels = axes.ravel()[len(scales) - 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(
        f"Baseline vs ER-Mapping vs hierarchical ER: TP={result['tp']}, {result['tokens_per_device']:g} "
        f"decode tokens/device ({result['time_model']} model)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return save_figure(fig, out)
