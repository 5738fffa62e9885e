"""`make run` / `meshserve demo`: the wafer communication comparison on the bundled presets, with plots."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console


def run_demo(out_dir: str | Path = "out") -> None:
    """Run `reproduce comm`, draw the wsc-8x8 heatmaps for baseline and ER, print where the files are."""
    from meshserve.atomic import all_or_nothing, check_writable
    from meshserve.wafer.plots import heatmap_png
    from meshserve.wafer.report import run_layer, run_reproduce_comm

    check_writable(out_dir, "out", folder=True)
    start = time.perf_counter()
    console = Console(width=max(Console().width, 150))
    console.rule("meshserve demo: MoE communication on a wafer-scale chip (MoEntwine reproduction)")
    with all_or_nothing():
        result = run_reproduce_comm(str(out_dir))
        written = [Path(result["plot"]), Path(out_dir) / "wafer_comm.json"]
        for mapping in ("baseline", "er", "er-bal"):
            hw, mo, m, tokens, layer = run_layer("wsc-8x8", "deepseek-v3", 4, mapping, 64, None, 4096,
                                                 "bottleneck")
            written.append(heatmap_png(hw, mo, m, tokens, layer,
                                       Path(out_dir) / f"wafer_heatmap_{mapping}.png"))
    console.print("files:")
    for path in written:
        console.print(f"  {path}")
    console.print(f"demo took {time.perf_counter() - start:.1f} s. Next: `meshserve wafer simulate --mapping "
                  "er-bal`, `meshserve wafer heatmap --mapping er --out er.png`, `meshserve wafer --help`.")
