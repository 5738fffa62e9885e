"""Where does a mesh link saturate? The default of costs.yaml's ``migration_link_ceiling``.

A saturated uniform all-to-all (100 packets of 20 flits per node, XY, 8 VCs: the BookSim2 check's
settings) on the project's flit model: the busiest link carries ``bottleneck`` cycles of flits
(the bottleneck model's time) while the whole batch takes ``flit`` cycles, so that link is busy
bottleneck / flit of the time at best: the highest utilisation a streamed migration can count on.
Printed beside BookSim2's own ratio (the bottleneck time over its measured cycles for the same batch,
experiments/booksim2_cycles.yaml) and the value costs.yaml uses.

Run: .venv/bin/python benchmarks/wafer_saturation.py [--mesh 8]
"""

from __future__ import annotations

import argparse

from meshserve.wafer.costs import default_costs
from meshserve.wafer.noc import booksim_reference, noc_cycles


def saturation(size: int) -> tuple[float, float | None]:
    """Busiest link's utilisation over a saturated uniform all-to-all on a size x size mesh: in the
    flit model, and in BookSim2's measured run (None where it was not measured)."""
    result = noc_cycles(size, size, "uniform", 100, 20, models=("bottleneck", "flit"))
    cycles, booksim = result["cycles"], booksim_reference(result)
    return cycles["bottleneck"] / cycles["flit"], None if booksim is None else cycles["bottleneck"] / booksim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    for size in args.mesh:
        flit, booksim = saturation(size)
        measured = "-" if booksim is None else f"{booksim:.3f}"
        print(f"{size}x{size} uniform: flit model {flit:.3f}, BookSim2 {measured}")
    print(f"costs.yaml migration_link_ceiling: {default_costs().migration_link_ceiling:.2f} (the 8x8 figure)")


if __name__ == "__main__":
    main()
