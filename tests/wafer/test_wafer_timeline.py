"""`meshserve wafer simulate --trace-out`: one decode step as a Chrome trace."""

import json

import pytest
from typer.testing import CliRunner

from meshserve.cli import app
from meshserve.wafer.models import load_model
from meshserve.wafer.report import run_layer
from meshserve.wafer.timeline import DIES, LINKS, PHASES

runner = CliRunner()


def test_the_trace_loads_and_has_a_track_per_die_link_class_and_phase(tmp_path):
    out = tmp_path / "step.json"
    args = ["wafer", "simulate", "--hardware", "wsc-4x8x8", "--mapping", "her", "--trace-out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    events = json.loads(out.read_text())["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert {names[DIES, d] for d in range(256)} == {f"die {d}" for d in range(256)}
    assert {"mesh", "wafer-up", "wafer-down"} <= {n for (pid, _), n in names.items() if pid == LINKS}
    spans = [e for e in events if e["ph"] == "X"]
    step = [e for e in spans if e["pid"] == PHASES]
    model = load_model("deepseek-v3")
    phases = ["attention", "reduce-scatter", "wafer all-gather", "dispatch", "experts", "combine"]
    phases += ["return reduce-scatter", "return all-gather"]  # the output's way back (costs.yaml)
    assert [e["name"] for e in step[model.first_dense_layers :]] == phases * model.num_moe_layers
    for a, b in zip(step, step[1:], strict=False):  # phases run back to back
        assert b["ts"] == pytest.approx(a["ts"] + a["dur"])
    # each die's experts last its own roofline time, never longer than the phase
    hw, _, _, _, layer = run_layer("wsc-4x8x8", "deepseek-v3", 4, "her", 64, None, 4096, "bottleneck")
    experts = [e for e in spans if e["pid"] == DIES and e["name"] == "experts" and e["args"]["layer"] == 3]
    assert sorted(e["dur"] for e in experts) == pytest.approx(sorted(layer.expert_s * 1e6))
    # the inter-wafer links carry only the wafer all-gather and its undoing on the way back (her
    # keeps the all-to-all inside a wafer)
    wafer = {n: t for (pid, t), n in names.items() if pid == LINKS}["wafer-up"]
    crossing = {e["name"] for e in spans if e["pid"] == LINKS and e["tid"] == wafer}
    assert crossing == {"wafer all-gather", "return reduce-scatter"}
    assert hw.num_devices == 256
