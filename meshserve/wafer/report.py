"""Build a layer evaluation from CLI-style arguments and print it as a rich table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from meshserve.wafer.hardware import Hardware, load_hardware
from meshserve.wafer.limits import check_layer
from meshserve.wafer.mapping import Mapping, make_mapping
from meshserve.wafer.models import MoEModel, load_model
from meshserve.wafer.simulate import LayerResult, simulate_layer, step_s
from meshserve.wafer.topology import topology_for


def run_layer(
    hardware: str,
    model: str,
    tp: int,
    mapping: str,
    tokens_per_device: float,
    ep: int | None,
    context: int,
    time_model: str,
) -> tuple[Hardware, MoEModel, Mapping, float, LayerResult]:
    """Load presets, build the mapping and evaluate one MoE layer."""
    hw, mo = load_hardware(hardware), load_model(model)
    check_layer(hw, mo.routed_experts)
    m = make_mapping(hw, tp, mapping)
    layer = simulate_layer(hw, mo, m, tokens_per_device, ep=ep, context=context, time_model=time_model)
    return hw, mo, m, tokens_per_device, layer


def print_layer(hw: Hardware, mo: MoEModel, m: Mapping, tokens: float, layer: LayerResult) -> None:
    """One row per phase of an MoE layer, then the decode-step totals."""
    topo = topology_for(hw)
    table = Table(
        title=f"{mo.name} on {hw.name}: mapping {m.name}, TP={m.tp}, DP={m.num_groups}, "
        f"{tokens:g} tokens/device; one MoE layer"
    )
    columns = (
        "phase",
        "time (us)",
        "bandwidth (us)",
        "latency (us)",
        "hottest link",
        "link load (MB)",
        "model",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("phase", "hottest link", "model") else "right")
    for p in layer.phases:
        link = topo.link_name(p.hottest_link) if p.hottest_link >= 0 else "-"
        load = f"{p.hottest_bytes / 1e6:.3f}" if p.hottest_link >= 0 else "-"
        table.add_row(
            p.name, *(f"{t * 1e6:.2f}" for t in (p.time_s, p.bandwidth_s, p.latency_s)), link, load, p.model
        )
    console = Console(width=max(Console().width, 130))
    console.print(table)
    step = step_s(hw, mo, m, layer, tokens)
    console.print(
        f"MoE layer: {layer.total_s * 1e6:.1f} us = compute {layer.compute_s * 1e6:.1f} + communication "
        f"{layer.comm_s * 1e6:.1f} (all-to-all {layer.all_to_all_s * 1e6:.1f}, attention reduction "
        f"{layer.attention_comm_s * 1e6:.1f}, output return {layer.return_s * 1e6:.1f}); "
        f"decode step over {mo.num_layers} layers: {step * 1e3:.2f} ms; "
        f"communication times from the {layer.time_model} model, compute from the die roofline."
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.1f}%"


def _reduction(x: float | None) -> str:
    """A reduction (fraction; negative = an increase) as a percentage."""
    return "n/a" if x is None else f"{x * 100:.1f}%" if x >= 0 else f"none ({-x * 100:.1f}% more)"


def print_comm(result: dict, console: Console) -> None:
    """The reproduce-comm tables: comparison, anchors beside ours, and the open question."""
    kinds = list(dict.fromkeys(k for r in result["rows"] for k in r["mappings"]))
    table = Table(
        title="Communication per MoE layer in us: attention reduction + all-to-all + output return "
        f"(change vs baseline), TP={result['tp']}, "
        f"{result['tokens_per_device']:g} tokens/device, {result['time_model']} model"
    )
    for col in ["model", "platform", *kinds]:
        table.add_column(col, justify="left" if col in ("model", "platform") else "right")
    for r in result["rows"]:
        cells = []
        for k in kinds:
            if k not in r["mappings"]:
                cells.append("-")
                continue
            us = r["mappings"][k]["comm_us"]
            cells.append(f"{us:.1f}" if k == "baseline" else f"{us:.1f} ({_pct(-r['reduction'][k])})")
        table.add_row(r["model"], r["hardware"], *cells)
    console.print(table)

    p = result["paper"]
    anchors = Table(
        title="Paper anchors beside ours (reduction = 1 - mapping / baseline; max over rows). "
        "The paper does not say whether its figures count the attention reduction."
    )
    for col in ("figure", "paper", "ours: total communication", "ours: all-to-all only"):
        anchors.add_column(col)
    labels = {
        "er": "ER-Mapping (our reading of the paper's construction)",
        "er-bal": "ER, balanced rings",
        "her": "hierarchical ER, wafer-wide all-to-all",
        "her-bal": "hierarchical ER, balanced rings",
        "her-ftd": "hierarchical ER, FTD-block all-to-all",
    }
    for k in kinds[1:]:
        key = k.replace("-", "_")
        paper = p["er_reduction_max"] if k.startswith("er") else p["her_reduction_max"]
        anchors.add_row(
            f"{labels.get(k, k)}: reduction, max",
            f"up to {paper * 100:.0f}%",
            _reduction(result[f"{key}_reduction_max"]),
            _reduction(result[f"{key}_a2a_reduction_max"]),
        )
    anchors.add_row(
        "ER all-reduce slowdown (first model, wsc-8x8)",
        f"{p['er_allreduce_slowdown']:.1f}x",
        f"er {result['er_allreduce_slowdown']:.2f}x, er-bal {result['er_bal_allreduce_slowdown']:.2f}x",
        "-",
    )
    console.print(anchors)

    q = result["open_question"]
    growth = Table(title=f"Open question: hottest link ER / baseline ({q['model']}, TP=4, 64 tokens/device)")
    for col in (
        "mesh",
        "all-reduce er",
        "all-reduce er-bal",
        "dispatch er",
        "dispatch er-bal",
        "comm er",
        "comm er-bal",
    ):
        growth.add_column(col, justify="right")
    for g in q["growth"]:
        ratios = [g[f"{k}_{what}_hot_ratio"] for what in ("allreduce", "dispatch") for k in ("er", "er-bal")]
        growth.add_row(
            g["mesh"], *(f"{r:.2f}x" for r in ratios), _pct(-g["er_reduction"]), _pct(-g["er-bal_reduction"])
        )
    console.print(growth)
    console.print(
        "  (digest's back-of-envelope: all-reduce hottest link 2x / 4x / 8x on 4x4 / 8x8 / 16x16, "
        "all-to-all hottest link halved; 'comm' columns: change of communication time)"
    )

    regimes = Table(
        title=f"Where ER wins: change of communication vs baseline, er / er-bal "
        f"({q['model']} shapes, top-k varied; negative = ER better)"
    )
    ks = sorted({r["top_k"] for r in q["regimes"]})
    tokens = sorted({r["tokens_per_device"] for r in q["regimes"]})
    for col in ["mesh", "TP", *[f"top-{k}, {t:g} tok/dev" for k in ks for t in (tokens[0], tokens[-1])]]:
        regimes.add_column(col, justify="right")
    by_key = {(r["mesh"], r["tp"], r["top_k"], r["tokens_per_device"]): r for r in q["regimes"]}
    for mesh, tp in dict.fromkeys((r["mesh"], r["tp"]) for r in q["regimes"]):
        cells = [by_key[mesh, tp, k, t] for k in ks for t in (tokens[0], tokens[-1])]
        regimes.add_row(
            mesh, str(tp), *[f"{_pct(-c['er_reduction'])} / {_pct(-c['er-bal_reduction'])}" for c in cells]
        )
    console.print(regimes)
    console.print(
        f"  ER (paper's construction) cuts communication in {result['regimes_er_wins']} of "
        f"{result['regimes_total']} regimes (mesh x TP x top-k x tokens/device {tokens}), "
        f"er-bal in {result['regimes_er_bal_wins']}."
    )


def print_wafer_links(result: dict, console: Console) -> None:
    """Reductions on the multi-wafer platform as the assumed inter-wafer bandwidth varies."""
    sweep = result["wafer_link_sweep"]
    kinds = [k.removesuffix("_reduction") for k in sweep[0] if k.endswith("_reduction")]
    table = Table(
        title="Multi-wafer (wsc-4x8x8, first model): communication reduction vs baseline as the "
        "assumed per-die inter-wafer bandwidth varies"
    )
    for col in ["inter-wafer GB/s per die", "baseline (us)", *kinds]:
        table.add_column(col, justify="right")
    for s in sweep:
        table.add_row(
            f"{s['wafer_link_gb_per_s']:g}",
            f"{s['baseline_us']:.1f}",
            *(_reduction(s[f"{k}_reduction"]) for k in kinds),
        )
    console.print(table)


def print_injection(result: dict, console: Console) -> None:
    """ER against the baseline as each die's injection/ejection port bandwidth varies."""
    sweep = result["injection_sweep"]
    kinds = [k.removesuffix("_dispatch_ratio") for k in sweep[0] if k.endswith("_dispatch_ratio")]
    table = Table(
        title=f"What a die can inject ({sweep[0]['hardware']}, first model): change vs baseline as "
        "each die's injection/ejection port bandwidth varies"
    )
    cols = [f"{k}: {what}" for k in kinds for what in ("total", "all-to-all", "dispatch time ratio")]
    for col in ["port GB/s per die", "baseline (us)", *cols]:
        table.add_column(col, justify="right")
    for s in sweep:
        cells = [
            (
                _reduction(s[f"{k}_reduction"]),
                _reduction(s[f"{k}_a2a_reduction"]),
                f"{s[f'{k}_dispatch_ratio']:.2f}x",
            )
            for k in kinds
        ]
        table.add_row(
            f"{s['injection_gb_per_s']:g}",
            f"{s['baseline_us']:.1f}",
            *(cell for row in cells for cell in row),
        )
    console.print(table)


def print_platforms(result: dict, console: Console) -> None:
    """Communication per MoE layer on platforms of about the same size, baseline mapping."""
    rows = result["platforms"]
    names = [k for k in rows[0] if k != "model"]
    table = Table(title="Platforms (baseline mapping, us of communication per MoE layer)")
    for col in ["model", *names]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(r["model"], *(f"{r[n]:.1f}" for n in names))
    console.print(table)
    ours = _reduction(result["wsc_vs_dgx_reduction_avg"])
    console.print(
        f"  wsc-8x8 vs dgx-b200, mean reduction: ours {ours}, "
        f"paper {result['paper']['wsc_vs_dgx_reduction_avg'] * 100:.0f}%"
    )


def run_reproduce_comm(
    out: str, tokens_per_device: float = 64, time_model: str = "bottleneck", as_json: bool = False
) -> dict:
    """Run the comparison, write comm.json and the chart into `out`, print tables (or JSON)."""
    import json
    from pathlib import Path

    from meshserve.atomic import all_or_nothing, check_writable, write_atomic
    from meshserve.wafer.experiments import run_comm
    from meshserve.wafer.plots import comparison_png

    folder = check_writable(Path(out), "out", folder=True)
    result = run_comm(tokens_per_device, time_model)
    with all_or_nothing():
        result["plot"] = str(comparison_png(result, folder / "wafer_comm.png"))
        text = json.dumps(result, default=lambda x: x.item())  # numpy scalars -> Python numbers
        write_atomic(folder / "wafer_comm.json", text.encode())
    if as_json:
        print(text)
    else:
        console = Console(width=max(Console().width, 150))
        print_comm(result, console)
        print_wafer_links(result, console)
        print_injection(result, console)
        print_platforms(result, console)
        console.print(f"wrote {result['plot']} and {folder / 'wafer_comm.json'}")
    return result
