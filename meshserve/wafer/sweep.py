"""Sweeps: the cross product models x platforms x TP x batch x balancer, in-process or on Ray.

A sweep file (YAML) lists values per axis; every combination is one iteration-level simulation
(:func:`meshserve.wafer.balance_setup.run_setup`). Results go to ``results.csv`` (and
``results.parquet`` when pyarrow is installed) plus PNG plots. See
``meshserve/wafer/presets/sweeps/example.yaml``.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from meshserve.atomic import all_or_nothing, check_writable, write_atomic
from meshserve.errors import integer, require
from meshserve.wafer.balance import BALANCERS, BalanceConfig
from meshserve.wafer.balance_setup import BalanceSetup, run_summary
from meshserve.wafer.capacity import NO_FIT, fits
from meshserve.wafer.fanout import EXECUTORS, run_many
from meshserve.wafer.presets import read_yaml

AXES = {
    "models": "model",
    "platforms": "hardware",
    "tp": "tp",
    "batch": "tokens_per_device",
    "balancers": "balancer",
    "mappings": "mapping",
}
SCALARS = ("scenario", "iterations", "seed", "balance", "trace")


@dataclass(frozen=True)
class SweepSpec:
    """Values per axis (each a list) and the settings shared by every run."""

    models: tuple[str, ...]
    platforms: tuple[str, ...]
    tp: tuple[int, ...]
    batch: tuple[int, ...]
    balancers: tuple[str, ...]
    mappings: tuple[str | None, ...] = (None,)
    scenario: str = "mixed"
    iterations: int = 200
    seed: int = 0
    balance: BalanceConfig = BalanceConfig()
    trace: str | None = None  # a recorded trace (.npz) replayed instead of a synthetic one

    def setups(self) -> list[BalanceSetup]:
        """Every combination, in a stable order (models outermost, balancers innermost)."""
        out = []
        for model, hw, tp, batch, mapping, balancer in itertools.product(
            self.models, self.platforms, self.tp, self.batch, self.mappings, self.balancers
        ):
            out.append(
                BalanceSetup(
                    model=model,
                    hardware=hw,
                    tp=tp,
                    mapping=mapping,
                    tokens_per_device=batch,
                    balancer=balancer,
                    scenario=self.scenario,
                    iterations=self.iterations,
                    seed=self.seed,
                    config=self.balance,
                    trace=self.trace,
                )
            )
        return out


def _as_list(data: dict, key: str, kind: type, where: str) -> tuple:
    value = data[key]
    values = value if isinstance(value, list) else [value]
    require(len(values) > 0, f"{where}.{key}", "must list at least one value")
    for v in values:
        ok = isinstance(v, kind) and not isinstance(v, bool)
        require(ok, f"{where}.{key}", f"values must be {kind.__name__}, got {v!r}")
    return tuple(values)


def parse_sweep(data: Any, where: str = "sweep") -> SweepSpec:
    """Validate a sweep mapping; every error names the field (e.g. ``sweep.balancers``)."""
    require(isinstance(data, dict), where, "must be a mapping of axes")
    unknown = set(data) - set(AXES) - set(SCALARS)
    require(
        not unknown,
        f"{where}.{sorted(unknown)[0] if unknown else ''}",
        f"unknown key; allowed: {', '.join([*AXES, *SCALARS])}",
    )
    for key in ("models", "platforms", "tp", "batch", "balancers"):
        require(key in data, f"{where}.{key}", "missing; list one or more values")
    balancers = _as_list(data, "balancers", str, where)
    for b in balancers:
        require(b in BALANCERS, f"{where}.balancers", f"unknown {b!r}; allowed: {', '.join(BALANCERS)}")
    balance = data.get("balance", {}) or {}
    require(isinstance(balance, dict), f"{where}.balance", "must be a mapping of balancer settings")
    known = {f.name for f in fields(BalanceConfig)}
    bad = set(balance) - known
    require(not bad, f"{where}.balance", f"unknown {sorted(bad)}; allowed: {', '.join(sorted(known))}")
    iterations = data.get("iterations", 200)
    require(isinstance(iterations, int) and iterations >= 1, f"{where}.iterations", "must be an integer >= 1")
    return SweepSpec(
        models=_as_list(data, "models", str, where),
        platforms=_as_list(data, "platforms", str, where),
        tp=_as_list(data, "tp", int, where),
        batch=_as_list(data, "batch", int, where),
        balancers=balancers,
        mappings=_as_list(data, "mappings", str, where) if "mappings" in data else (None,),
        scenario=str(data.get("scenario", "mixed")),
        iterations=iterations,
        seed=integer(data.get("seed", 0), f"{where}.seed", 0),
        balance=BalanceConfig(**balance),
        trace=str(data["trace"]) if data.get("trace") is not None else None,
    )


def load_sweep(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and validate a sweep YAML file."""
    path = Path(path)
    require(path.is_file(), "sweep", f"no such file: {path}")
    return parse_sweep(read_yaml(path, "sweep"))


def run_sweep(spec: SweepSpec, executor: str = "local", progress: bool = True) -> list[dict]:
    """Run every combination; rows come back in :meth:`SweepSpec.setups` order."""
    require(executor in EXECUTORS, "executor", f"unknown {executor!r}; allowed: {', '.join(EXECUTORS)}")
    setups = spec.setups()
    for s in setups:  # fail on bad input before any long run starts
        s.check()
    return run_many(run_summary, setups, executor, progress, "sweep")


def write_results(rows: list[dict], out: str | os.PathLike[str]) -> list[Path]:
    """results.csv (and results.parquet if pyarrow is there) under ``out``."""
    out = Path(out)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    written = [write_atomic(out / "results.csv", buf.getvalue().encode())]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    written.append(write_atomic(out / "results.parquet", sink.getvalue().to_pybytes()))
    return written


def plot_sweep(rows: list[dict], out: str | os.PathLike[str]) -> Path:
    """One bar chart: per-device MoE throughput of every combination, grouped by balancer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meshserve.wafer.plots import save_figure

    def key(r: dict) -> tuple:
        return (r["model"], r["hardware"], r["tp"], r["tokens_per_device"], r["mapping"])

    labels = list(dict.fromkeys(key(r) for r in rows))
    balancers = list(dict.fromkeys(r["balancer"] for r in rows))
    value = {(*key(r), r["balancer"]): r["moe_tokens_per_s_per_device"] for r in rows}
    unfit = {(*key(r), r["balancer"]) for r in rows if not r.get("fits_memory", True)}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * len(balancers) / 2), 4.5))
    width = 0.8 / len(balancers)
    for j, b in enumerate(balancers):
        xs = [i + j * width for i in range(len(labels))]
        bars = ax.bar(xs, [value.get((*lab, b), 0.0) for lab in labels], width, label=b)
        for bar, lab in zip(bars, labels, strict=True):
            if (*lab, b) in unfit:  # exceeds a die's HBM: hatched
                bar.set_hatch("xx")
                bar.set_edgecolor("red")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{m}\n{h} tp{t} b{bt}\n{mp}" for m, h, t, bt, mp in labels], fontsize=7)
    ax.set_ylabel("MoE tokens / s / device")
    ax.set_title("Sweep: per-device MoE throughput by balancer (hatched: does not fit in HBM)")
    ax.legend(title="balancer")
    fig.tight_layout()
    return save_figure(fig, Path(out) / "sweep_throughput.png", dpi=120)


def sweep_command(path: str, executor: str = "local", out: str = "out/sweep") -> list[dict]:
    """What `meshserve wafer sweep` does: load, run with a progress bar, write CSV and plot."""
    check_writable(out, "out", folder=True)
    spec = load_sweep(path)
    rows = run_sweep(spec, executor=executor)
    with all_or_nothing():
        written = write_results(rows, out)
        written.append(plot_sweep(rows, out))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep: {len(rows)} runs")
    cols = ("model", "hardware", "tp", "tokens_per_device", "mapping", "balancer")
    for col in (*cols, "max/mean", "stall ms", "tok/s/device"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            *(str(r[c]) for c in cols),
            f"{r['max_over_mean_load']:.2f}",
            f"{r['stall_s'] * 1e3:.1f}",
            f"{r['moe_tokens_per_s_per_device']:,.0f}" + ("" if fits(r) else NO_FIT),
        )
    console = Console()
    console.print(table)
    console.print("wrote " + ", ".join(str(p) for p in written))
    return rows
