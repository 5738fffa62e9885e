"""The NoC time models against BookSim2's measured cycles: every standard pattern, 4x4 to 16x16, one and
four injection ports per die (the reference batches in presets/experiments/booksim2_cycles.yaml, measured
by benchmarks/booksim_reference.py). Prints model / BookSim2 per (mesh, ports, pattern) and a summary.

Run: .venv/bin/python benchmarks/noc_validation.py [--meshes 4 8] [--models flit packet bottleneck]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from meshserve.wafer.booksim import reference_matrix, reference_runs, settings
from meshserve.wafer.noc import noc_cycles

MODELS = ("flit", "packet", "bottleneck")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meshes", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--ports", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    packets, flits = settings()
    runs = [r for r in reference_runs() if r.mesh in args.meshes and r.ports in args.ports]
    rows, start = [], time.perf_counter()
    for run in tqdm(runs, desc="model batches"):
        result = noc_cycles(
            run.mesh,
            run.mesh,
            run.pattern,
            packets,
            flits,
            models=tuple(args.models),
            injection_ports=run.ports,
            matrix=reference_matrix(run),
        )
        rows.append(
            {
                "mesh": run.mesh,
                "ports": run.ports,
                "pattern": run.pattern,
                "booksim2": run.cycles,
                **{m: result["cycles"][m] / run.cycles for m in args.models},
            }
        )
    print(f"model cycles / BookSim2 cycles ({packets} x {flits}-flit packets per die, saturated batch)")
    print(
        f"{'mesh':>5} {'ports':>5} {'pattern':10} {'BookSim2':>9} "
        + " ".join(f"{m:>10}" for m in args.models)
    )
    for r in rows:
        ratios = " ".join(f"{r[m]:10.3f}" for m in args.models)
        print(f"{r['mesh']:>3}^2 {r['ports']:>5} {r['pattern']:10} {r['booksim2']:9,.0f} {ratios}")
    for m in args.models:
        err = np.abs(np.array([r[m] for r in rows]) - 1.0)
        within = int((err <= 0.10).sum())
        print(
            f"{m}: within 10% on {within} of {len(rows)}; "
            f"worst {err.max():.3f} off; mean {err.mean():.3f} off"
        )
    print(f"took {time.perf_counter() - start:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
