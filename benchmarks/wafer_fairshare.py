"""What `reproduce balance --time-model fair-share` costs per all-to-all layout, and how far it moves.

For each layout the ladder uses (platform, mapping), takes the first ``--rows`` (iteration, layer)
rows of the unbalanced run's DeepSeek-V3 trace (64 tokens per device, seed 0) and times the
dispatch and the combine under max-min fair sharing (fair_a2a.FairPhase): the fair-share /
bottleneck ratio (mean, max), how many domain-rows the proof did not cover (and were drained), and
the seconds per row.

    .venv/bin/python benchmarks/wafer_fairshare.py --rows 8
"""

from __future__ import annotations

import argparse
import time

from meshserve.wafer.balance_setup import BalanceSetup, setup_parts
from meshserve.wafer.models import load_model

LAYOUTS = (
    ("nvl72", "baseline"),
    ("wsc-4x8x8", "her-ftd"),
    ("wsc-4x8x8", "her"),
    ("wsc-4x8x8", "er"),
    ("wsc-4x8x8", "baseline"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8, help="(iteration, layer) rows per layout")
    rows = parser.parse_args().rows
    layers = load_model(BalanceSetup.model).num_moe_layers  # rows of one iteration
    for hardware, mapping in LAYOUTS:
        setup = BalanceSetup(
            hardware=hardware,
            mapping=mapping,
            balancer="none",
            iterations=-(-rows // layers) + 1,
            time_model="fair-share",
        )
        parts = setup_parts(setup)
        load = parts.base.device_load(parts.trace.counts).reshape(-1, parts.comm.num_devices)[:rows]
        for name, phase in zip(("dispatch", "combine"), parts.comm.fair, strict=True):
            bottleneck = phase.bottleneck(load)
            start = time.perf_counter()
            ratio = phase.time(load, 0.0) / bottleneck
            took = time.perf_counter() - start
            drained = sum(len(g.solved) for g in phase.groups)
            flows = phase.groups[0].flows.shape[0]
            print(
                f"{hardware} {mapping} {name}: {len(phase.groups)} domain(s) x {flows:,} flows; "
                f"fair-share / bottleneck over {len(load)} rows mean {ratio.mean():.4f} max "
                f"{ratio.max():.4f}; {drained} of {len(load) * len(phase.groups)} domain-rows drained; "
                f"{took / len(load):.2f} s per row",
                flush=True,
            )


if __name__ == "__main__":
    main()
