"""ER vs baseline MoE dispatch on an 8x8 mesh through every NoC time model, with 1 and 4 ports per die.

The cycle-level cross-check in issue 13 (BookSim2 driven by the project's dispatch matrices for
DeepSeek-V3, TP=4, 64 tokens per die) found ER's dispatch 0.67x the baseline's with one
injection/ejection port per die, not the bottleneck model's 0.50x, and 0.49x with four ports.
This replays the same two traffic matrices, scaled to packets of 20 flits (the baseline's busiest
die sends 100; ER's matrix with the same scale), through `meshserve wafer noc`'s models with one
and four injection/ejection ports per die and prints the ratios beside BookSim2's.

    .venv/bin/python benchmarks/noc_dispatch.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.mapping import expert_placement, make_mapping
from meshserve.wafer.models import load_model
from meshserve.wafer.noc import noc_cycles
from meshserve.wafer.traffic import dispatch

MODELS = ("bottleneck", "packet", "flit")
FLITS = 20  # flits per packet


def main() -> None:
    hw, model = load_hardware("wsc-8x8"), load_model("deepseek-v3")
    traffic = {
        kind: dispatch(
            make_mapping(hw, 4, kind), expert_placement(256, 64), 4 * 64, model.top_k, model.token_bytes
        ).traffic
        for kind in ("baseline", "er")
    }
    scale = 100 / traffic["baseline"].sum(axis=1).max()
    booksim = {1: 0.67, 4: 0.49}  # ER / baseline dispatch, BookSim2, by ports per die
    with tempfile.TemporaryDirectory() as tmp:
        for ports, reference in booksim.items():
            cycles = {}
            for kind, matrix in traffic.items():
                path = Path(tmp) / f"{kind}.npy"
                np.save(path, np.rint(matrix * scale).astype(np.int64))
                result = noc_cycles(8, 8, str(path), 1, FLITS, models=MODELS, injection_ports=ports)
                cycles[kind] = result["cycles"]
                took = ", ".join(f"{m} {s:.1f} s" for m, s in result["seconds"].items())
                packets = int(np.load(path).sum())
                print(
                    f"{ports} port(s), {kind:8s} dispatch: {packets:,} packets, cycles {result['cycles']} "
                    f"({took})"
                )
            for m in MODELS:
                print(
                    f"{ports} port(s): ER / baseline dispatch time, {m:10s}: "
                    f"{cycles['er'][m] / cycles['baseline'][m]:.3f} (BookSim2: {reference})"
                )
            print_bounds(traffic, scale, ports, cycles)


def print_bounds(traffic: dict[str, np.ndarray], scale: float, ports: int, cycles: dict) -> None:
    """Why one port costs ER more than the baseline: the two lower bounds each mapping runs against.

    Every die sends and receives the same packets in both mappings (FTD rules move where a token
    goes, not how much a die sends), so the injection / ejection bound is the same for both; ER
    halves the link bound. Where ER's link bound comes down to the injection bound, any stall of
    a die's injection queue (its head packet blocked downstream) is time the port never makes up.
    """
    for kind, matrix in traffic.items():
        packets = np.rint(matrix * scale).astype(np.int64)
        np.fill_diagonal(packets, 0)
        port = max(packets.sum(axis=1).max(), packets.sum(axis=0).max()) * FLITS / ports
        print(
            f"{ports} port(s), {kind:8s}: injection/ejection bound {port:,.0f} cycles, link bound "
            f"{cycles[kind]['bottleneck']:,} cycles; over the larger: "
            + ", ".join(
                f"{m} {cycles[kind][m] / max(port, cycles[kind]['bottleneck']):.2f}x"
                for m in MODELS
                if m != "bottleneck"
            )
        )


if __name__ == "__main__":
    main()
