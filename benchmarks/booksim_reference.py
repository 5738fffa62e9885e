"""Run BookSim2 (a cycle-level NoC simulator, built beside the repo, never committed) on the batches
`meshserve wafer noc` models, and write the cycle counts to the data file the validation reads.

    python benchmarks/booksim_reference.py --booksim ../booksim2/src/booksim [--perm-helper ./perm]

Every run: XY (dimension-order) routing, BookSim2's default router (8 VCs set, 8-flit VC buffers,
1-cycle routing / VC / switch allocation and traversal, 1-cycle channels), 20-flit packets, one batch of
100 packets per die injected at saturation (`sim_type = batch`, `injection_rate = 1`); the figure is
BookSim2's batch duration. One injection port per die is its `mesh`; four are its `cmesh` with four
terminals per router (`c = 4`, no express links), each terminal sending 25 packets, the pattern applied
to the 2k x 2k grid of terminals. Uniform traffic is averaged over three seeds (the other patterns
are deterministic at saturation).

randperm's destinations come from BookSim2's own generator (perm_seed 0); `--perm-helper` names a
program that prints them for `NODES SEED` (a few lines of C++ calling BookSim2's random_utils, built
the same way as BookSim2); without it the destinations already in the data file are kept.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from datetime import date
from pathlib import Path

import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "meshserve" / "wafer" / "presets" / "experiments" / "booksim2_cycles.yaml"
PATTERNS = ("uniform", "transpose", "bitcomp", "bitrev", "shuffle", "tornado", "neighbor", "randperm")
MESHES = (4, 8, 16)
PORTS = (1, 4)
UNIFORM_SEEDS = (1, 2, 3)
PACKETS, FLITS = 100, 20
DURATION = re.compile(r"Overall min batch duration = (\d+)")


def config(k: int, ports: int, pattern: str, seed: int) -> str:
    """One BookSim2 configuration file's text."""
    if ports == 1:
        topology = "topology = mesh;\nrouting_function = dor;\n"
        batch = PACKETS
    else:
        topology = f"topology = cmesh;\nc = 4;\nx = {k};\ny = {k};\nxr = 2;\nyr = 2;\n"
        topology += "routing_function = dor_no_express;\n"
        batch = PACKETS // ports
    return (
        f"{topology}k = {k};\nn = 2;\nnum_vcs = 8;\nvc_buf_size = 8;\npacket_size = {FLITS};\n"
        f"traffic = {pattern};\nsim_type = batch;\nbatch_size = {batch};\nbatch_count = 1;\n"
        f"injection_rate = 1.0;\nseed = {seed};\n"
    )


def run_booksim(binary: Path, text: str) -> int:
    """Cycles of one batch."""
    with tempfile.NamedTemporaryFile("w", suffix=".cfg") as f:
        f.write(text)
        f.flush()
        # BookSim2 exits non-zero after a finished run too; its printed batch duration is the result
        out = subprocess.run([str(binary), f.name], capture_output=True, text=True).stdout
    match = DURATION.search(out)
    if match is None:
        raise RuntimeError(f"no batch duration in BookSim2's output:\n{out[-2000:]}")
    return int(match.group(1))


def permutation(helper: Path, nodes: int) -> list[int]:
    out = subprocess.run([str(helper), str(nodes), "0"], capture_output=True, text=True, check=True).stdout
    return [int(x) for x in out.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--booksim", type=Path, required=True, help="BookSim2 binary")
    ap.add_argument("--perm-helper", type=Path, help="prints BookSim2's randperm destinations for NODES SEED")
    ap.add_argument("--meshes", type=int, nargs="+", default=list(MESHES))
    ap.add_argument("--ports", type=int, nargs="+", default=list(PORTS))
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    args = ap.parse_args()

    data = yaml.safe_load(DATA.read_text()) if DATA.exists() else {}
    runs = data.setdefault("runs", [])
    perms = data.setdefault("randperm_destinations", {})
    todo = [(k, p, pat) for k in args.meshes for p in args.ports for pat in args.patterns]
    for k, ports, pattern in tqdm(todo, desc="BookSim2 batches"):
        seeds = UNIFORM_SEEDS if pattern == "uniform" else (0,)
        cycles = [run_booksim(args.booksim, config(k, ports, pattern, s)) for s in seeds]
        runs[:] = [r for r in runs if (r["mesh"], r["ports"], r["pattern"]) != (k, ports, pattern)]
        runs.append({"mesh": k, "ports": ports, "pattern": pattern, "cycles": cycles})
        nodes = k * k * (4 if ports == 4 else 1)
        if pattern == "randperm" and args.perm_helper is not None:
            perms[nodes] = permutation(args.perm_helper, nodes)
    runs.sort(key=lambda r: (r["ports"], r["mesh"], PATTERNS.index(r["pattern"])))
    data["measured"] = str(date.today())
    data["settings"] = {
        "packets_per_node": PACKETS,
        "flits_per_packet": FLITS,
        "vcs": 8,
        "vc_buffer_flits": 8,
    }
    header = (
        "# BookSim2's cycles for one saturated batch per (mesh k x k, injection ports, pattern): written by\n"
        "# benchmarks/booksim_reference.py (see its docstring for the settings); read by\n"
        "# benchmarks/noc_validation.py and `meshserve wafer noc`. Measured data, not fitted.\n"
    )
    DATA.write_text(header + yaml.safe_dump(data, sort_keys=False, width=120))
    print(f"wrote {DATA}")


if __name__ == "__main__":
    main()
