"""`meshserve wafer ...`: thin commands over the simulator. Heavy imports happen inside commands."""

from __future__ import annotations

import typer

from meshserve.atomic import check_writable
from meshserve.errors import number, require

app = typer.Typer(no_args_is_help=True, help="Wafer-scale MoE simulator (MoEntwine).")
reproduce = typer.Typer(no_args_is_help=True, help="Reproduce the paper's comparisons.")
app.add_typer(reproduce, name="reproduce")

HARDWARE = typer.Option("wsc-8x8", "--hardware", help="Hardware preset name or YAML path.")
MODEL = typer.Option("deepseek-v3", "--model", help="Model preset name or YAML path.")
TP = typer.Option(4, "--tp", help="Attention tensor-parallel degree (1, 2, 4, 8 ...).")
MAPPING = typer.Option(
    "er",
    "--mapping",
    help="baseline | er | er-bal | her | her-bal | her-ftd "
    "(readings: meshserve/wafer/presets/mappings.yaml).",
)
TOKENS = typer.Option(64, "--tokens-per-device", help="Decode tokens per device (a TP group holds TP x it).")
EP = typer.Option(None, "--ep", help="Devices holding the experts (default: all).")
CONTEXT = typer.Option(4096, "--context", help="Context length per sequence (KV-cache reads).")
TIME_MODEL = typer.Option("bottleneck", "--time-model", help="bottleneck | fair-share.")


@app.command()
def simulate(
    hardware: str = HARDWARE,
    model: str = MODEL,
    tp: int = TP,
    mapping: str = MAPPING,
    tokens_per_device: float = TOKENS,
    ep: int = EP,
    context: int = CONTEXT,
    time_model: str = TIME_MODEL,
    trace_out: str = typer.Option(
        None,
        "--trace-out",
        help="Also write one decode step as a Chrome trace JSON (per die, per link class, per "
        "phase; open in chrome://tracing or ui.perfetto.dev).",
    ),
) -> None:
    """Print one MoE layer phase by phase: time, hottest link and its load."""
    from meshserve.wafer.report import print_layer, run_layer

    if trace_out is not None:
        check_writable(trace_out, "trace_out")
    result = run_layer(hardware, model, tp, mapping, tokens_per_device, ep, context, time_model)
    print_layer(*result)
    if trace_out is not None:
        from meshserve.wafer.timeline import step_trace, write_trace

        print(f"wrote {write_trace(step_trace(*result, context), trace_out)}")


@app.command()
def presets() -> None:
    """List the built-in hardware and model presets (names for --hardware / --model)."""
    from rich.console import Console
    from rich.table import Table

    from meshserve.wafer.hardware import hardware_names, load_hardware
    from meshserve.wafer.models import load_model, model_names

    hardware = Table(title="hardware presets (--hardware)")
    for col in ("name", "kind", "devices", "link GB/s", "die TFLOP/s"):
        hardware.add_column(col, justify="left" if col in ("name", "kind") else "right")
    for name in hardware_names():
        hw = load_hardware(name)
        hardware.add_row(
            name,
            hw.kind,
            str(hw.num_devices),
            f"{hw.link_bandwidth / 1e9:g}",
            f"{hw.die.peak_flops / 1e12:g}",
        )
    models = Table(title="model presets (--model)")
    for col in ("name", "layers", "MoE layers", "routed experts", "top-k", "hidden"):
        models.add_column(col, justify="left" if col == "name" else "right")
    for name in model_names():
        mo = load_model(name)
        models.add_row(
            name,
            str(mo.num_layers),
            str(mo.num_moe_layers),
            str(mo.routed_experts),
            str(mo.top_k),
            str(mo.hidden_size),
        )
    console = Console()
    console.print(hardware)
    console.print(models)
    console.print("A YAML file path works wherever a preset name does (meshserve/wafer/presets/).")


@app.command()
def heatmap(
    hardware: str = HARDWARE,
    model: str = MODEL,
    tp: int = TP,
    mapping: str = MAPPING,
    tokens_per_device: float = TOKENS,
    ep: int = EP,
    out: str = typer.Option("out/wafer_heatmap.png", "--out", help="PNG file to write."),
) -> None:
    """Write link-load heatmaps of the attention reduction and the MoE all-to-all side by side."""
    require(out.lower().endswith(".png"), "out", f"is a PNG image: give a path ending .png, got {out!r}")
    check_writable(out, "out")
    from meshserve.wafer.plots import heatmap_png
    from meshserve.wafer.report import run_layer

    hw, mo, m, tokens, layer = run_layer(
        hardware, model, tp, mapping, tokens_per_device, ep, 4096, "bottleneck"
    )
    print(f"wrote {heatmap_png(hw, mo, m, tokens, layer, out)}")


@reproduce.command("comm")
def reproduce_comm(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    out: str = typer.Option("out", "--out", help="Folder for the plot and the JSON results."),
    tokens_per_device: float = TOKENS,
    time_model: str = TIME_MODEL,
) -> None:
    """Baseline vs ER vs hierarchical ER communication time, paper anchors beside ours."""
    check_writable(out, "out", folder=True)  # before the heavy imports, so a bad path fails at once
    from meshserve.wafer.report import run_reproduce_comm

    run_reproduce_comm(out, tokens_per_device=tokens_per_device, time_model=time_model, as_json=json_out)


# --- helper B commands --- (balancing: `reproduce balance`, `sweep`; registered below by helper B)


@reproduce.command("balance")
def reproduce_balance(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    out: str = typer.Option("out", "--out", help="Folder for balance.json and the plots."),
    iterations: int = typer.Option(None, "--iterations", help="Decode iterations per run [300]."),
    tokens_per_device: int = typer.Option(None, "--tokens-per-device", help="Decode tokens per device [64]."),
    scenario: str = typer.Option(None, "--scenario", help="Synthetic trace: fixed | mixed [mixed]."),
    models: str = typer.Option(
        None, "--models", help="Comma-separated model presets [deepseek-v3,deepseek-v2,qwen3-235b-a22b]."
    ),
    curves: bool = typer.Option(
        True,
        "--curves/--no-curves",
        help="Also sweep tokens per device, expert "
        "weight type, inter-wafer bandwidth and trace skew (first model).",
    ),
    executor: str = typer.Option(
        "processes",
        "--executor",
        help="processes (one worker per core) | local (one after another) | ray (pip install "
        "'meshserve[ray]'): where the independent runs go; the figures are the same.",
    ),
    time_model: str = typer.Option(
        None,
        "--time-model",
        help="bottleneck | fair-share [bottleneck]: how "
        "every run times the all-to-all, all-reduce and migration stalls.",
    ),
    costs: str = typer.Option(
        "realistic",
        "--costs",
        help="realistic | paper: charge the output return, migration HBM traffic, a link "
        "ceiling for migration and check memory (presets/costs.yaml), or none of them.",
    ),
) -> None:
    """Ablation ladder NVL72 -> WSC -> ER -> HER -> greedy -> topology-aware -> NI-Balancer.

    Defaults: meshserve/wafer/presets/experiments/balance.yaml."""
    check_writable(out, "out", folder=True)
    from meshserve.wafer.reproduce_balance import reproduce_balance as run

    names = None if models is None else tuple(m.strip() for m in models.split(",") if m.strip())
    run(
        out,
        as_json=json_out,
        iterations=iterations,
        tokens_per_device=tokens_per_device,
        scenario=scenario,
        models=names,
        curves=curves,
        executor=executor,
        time_model=time_model,
        costs=costs,
    )


@app.command()
def sweep(
    spec: str = typer.Argument(..., help="Sweep YAML (see meshserve/wafer/presets/sweeps/example.yaml)."),
    executor: str = typer.Option(
        "local", "--executor", help="local | processes | ray (pip install 'meshserve[ray]')."
    ),
    out: str = typer.Option("out/sweep", "--out", help="Folder for results.csv and plots."),
) -> None:
    """Cross product models x platforms x TP x batch x balancer; CSV + plots."""
    check_writable(out, "out", folder=True)
    from meshserve.wafer.sweep import sweep_command

    sweep_command(spec, executor=executor, out=out)


@app.command()
def noc(
    mesh: str = typer.Option("8x8", "--mesh", help="RxC mesh of routers, e.g. 8x8."),
    pattern: str = typer.Option(
        "uniform",
        "--pattern",
        help="uniform | transpose | bitcomp | bitrev | shuffle | tornado | neighbor | randperm | FILE.npy "
        "([nodes, nodes] packets per source and destination).",
    ),
    packets_per_node: int = typer.Option(100, "--packets-per-node", help="Packets each node sends."),
    flits_per_packet: int = typer.Option(20, "--flits-per-packet", help="Flits per packet."),
    time_model: list[str] = typer.Option(
        None,
        "--time-model",
        help="bottleneck | fair-share | packet | flit | flit-rr (repeat; default all but flit-rr).",
    ),
    injection_ports: int = typer.Option(
        None, "--injection-ports", help="Flits a node injects and ejects per cycle (default: noc.yaml)."
    ),
    router: str = typer.Option(
        "on-chip", "--router", help="on-chip (BookSim2's router) | die-to-die (the wafer's links; noc.yaml)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Cycles one batch of synthetic traffic takes on a mesh (1 flit per cycle per link), per time model."""
    from meshserve.wafer.noc import print_noc, run_noc

    run_noc(
        mesh,
        pattern,
        packets_per_node,
        flits_per_packet,
        tuple(time_model or ()),
        json_out,
        print_noc,
        injection_ports,
        router,
    )


@app.command()
def pd(
    hardware: str = HARDWARE,
    model: str = MODEL,
    tp: int = TP,
    mapping: str = MAPPING,
    tokens_per_device: float = TOKENS,
    prompt_tokens: int = typer.Option(2048, "--prompt-tokens", help="Mean prompt length (tokens)."),
    output_tokens: int = typer.Option(512, "--output-tokens", help="Mean output length (tokens)."),
    deploy: str = typer.Option("both", "--deploy", help="mixed | disagg | both."),
    prefill_dies: int = typer.Option(
        None,
        "--prefill-dies",
        help="Dies that prefill under disagg (whole mesh rows; default: the best split).",
    ),
    time_model: str = TIME_MODEL,
    tpot_slo_ms: float = typer.Option(
        None,
        "--tpot-slo-ms",
        help="Decode the largest batch per die (<= --tokens-per-device) meeting this TPOT and HBM.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    plot: str = typer.Option(
        None, "--plot", help="Also write a PNG: mixed vs disagg over presets/pd.yaml's prompt/output mixes."
    ),
) -> None:
    """Mixed vs disaggregated prefill/decode: TTFT, TPOT, throughput and KV moves over the mesh."""
    if tpot_slo_ms is not None:
        number(tpot_slo_ms, "tpot_slo_ms", 0, low_open=True)
    if plot is not None:
        require(
            plot.lower().endswith(".png"), "plot", f"is a PNG image: give a path ending .png, got {plot!r}"
        )
        check_writable(plot, "plot")
    from meshserve.wafer.pd import Mix
    from meshserve.wafer.pd_report import run_pd

    run_pd(
        hardware,
        model,
        Mix(prompt_tokens, output_tokens),
        deploy,
        prefill_dies,
        tp=tp,
        mapping=mapping,
        tokens_per_device=tokens_per_device,
        time_model=time_model,
        tpot_slo_s=None if tpot_slo_ms is None else tpot_slo_ms / 1e3,
        as_json=json_out,
        plot=plot,
    )
