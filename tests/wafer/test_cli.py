"""The `meshserve wafer` commands as a user runs them."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from meshserve.cli import app

runner = CliRunner()


def test_simulate_prints_a_table_per_phase():
    result = runner.invoke(
        app,
        [
            "wafer",
            "simulate",
            "--hardware",
            "wsc-8x8",
            "--model",
            "deepseek-v3",
            "--tp",
            "4",
            "--mapping",
            "er",
            "--tokens-per-device",
            "64",
        ],
    )
    assert result.exit_code == 0, result.output
    for word in ("all-reduce", "dispatch", "combine", "experts", "bottleneck", "hottest link"):
        assert word in result.output


def test_heatmap_writes_a_png(tmp_path):
    out = tmp_path / "hm.png"
    result = runner.invoke(app, ["wafer", "heatmap", "--mapping", "baseline", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reproduce_comm_json(tmp_path):
    result = runner.invoke(app, ["wafer", "reproduce", "comm", "--json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    # ER cuts the all-to-all; with the output return charged (a second attention reduction, which
    # ER slows) its total can be above the baseline's
    assert 0 < data["er_a2a_reduction_max"] < 1 and -1 < data["her_reduction_max"] < 1
    row = data["rows"][0]["mappings"]["er"]
    assert row["comm_us"] == pytest.approx(row["attention_us"] + row["all_to_all_us"] + row["return_us"])
    assert data["paper"]["her_reduction_max"] == 0.62 and data["time_model"] == "bottleneck"
    # her-ftd keeps the all-to-all in FTD blocks: it halves her's all-to-all on the multi-wafer scale
    assert data["her_ftd_a2a_reduction_max"] > data["her_a2a_reduction_max"]
    ports = [row["injection_gb_per_s"] for row in data["injection_sweep"]]
    assert ports == sorted(ports) and data["injection_sweep"][-1]["er_dispatch_ratio"] == pytest.approx(0.5)
    for kind in ("er", "er_bal", "her", "her_bal", "her_ftd"):
        # a total can more than double (her-ftd's return undoes its all-gather of full tokens)
        assert data[f"{kind}_reduction_max"] < 1 and -1 < data[f"{kind}_a2a_reduction_max"] < 1
    assert (tmp_path / "wafer_comm.png").exists() and (tmp_path / "wafer_comm.json").exists()


BAD = [
    (["--tp", "3"], "error: tp: 3 does not tile the 8x8 mesh of wsc-8x8; allowed: 1, 2, 4, 8"),
    (["--ep", "128"], "error: ep: must divide the 64 devices"),
    (["--hardware", "wsc-9x9"], "error: hardware: unknown preset 'wsc-9x9'; allowed:"),
    (["--model", "nope"], "error: model: unknown preset 'nope'"),
    (["--mapping", "her"], "error: mapping: her needs several wafers"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    command = [sys.executable, "-c", "from meshserve.cli import main; main()", "wafer", "simulate", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
