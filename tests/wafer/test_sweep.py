"""Sweeps and `meshserve wafer reproduce balance` / `meshserve wafer sweep` as a user runs them."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from meshserve.cli import app
from meshserve.errors import InputError
from meshserve.traces import ExpertTrace
from meshserve.wafer.presets import PRESET_DIR
from meshserve.wafer.sweep import load_sweep, parse_sweep, run_sweep

runner = CliRunner()


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess (exit code and stderr as a user sees them)."""
    main = "from meshserve.cli import main; main()"
    return subprocess.run([sys.executable, "-c", main, *args], capture_output=True, text=True)


TINY = {
    "models": ["deepseek-v3"],
    "platforms": ["wsc-8x8"],
    "tp": [4],
    "batch": [16],
    "balancers": ["none", "ni"],
    "iterations": 15,
    "balance": {"window_size": 5},
}


def write(tmp_path, data) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_sweep_is_the_cross_product_in_a_stable_order(tmp_path):
    spec = load_sweep(write(tmp_path, {**TINY, "batch": [16, 32], "platforms": ["wsc-8x8", "nvl72"]}))
    setups = spec.setups()
    assert len(setups) == 2 * 2 * 2
    assert [(s.hardware, s.tokens_per_device, s.balancer) for s in setups[:3]] == [
        ("wsc-8x8", 16, "none"),
        ("wsc-8x8", 16, "ni"),
        ("wsc-8x8", 32, "none"),
    ]
    assert setups[0].config.window_size == 5 and setups[0].iterations == 15


def test_example_sweep_file_is_valid():
    spec = load_sweep(PRESET_DIR / "sweeps" / "example.yaml")
    assert len(spec.setups()) == 2 * 2 * 1 * 2 * 4


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"balancers": ["magic"]}, "sweep.balancers"),
        ({"tp": ["four"]}, "sweep.tp"),
        ({"color": "red"}, "sweep.color"),
        ({"balance": {"window": 3}}, "sweep.balance"),
        ({"iterations": 0}, "sweep.iterations"),
    ],
)
def test_bad_sweeps_name_the_field(change, field):
    with pytest.raises(InputError) as err:
        parse_sweep({**TINY, **change})
    assert err.value.field == field


def test_bad_combination_fails_before_anything_runs():
    with pytest.raises(InputError) as err:
        run_sweep(parse_sweep({**TINY, "tp": [3]}), progress=False)
    assert err.value.field == "tp"


def test_sweep_command_writes_csv_and_plot(tmp_path):
    result = runner.invoke(app, ["wafer", "sweep", write(tmp_path, TINY), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "o" / "results.csv").open()))
    assert [r["balancer"] for r in rows] == ["none", "ni"]
    assert float(rows[1]["stall_s"]) == 0.0 and float(rows[0]["moe_tokens_per_s_per_device"]) > 0
    assert (tmp_path / "o" / "sweep_throughput.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_sweep_through_the_cli_is_one_line_and_exit_2(tmp_path):
    bad = write(tmp_path, {**TINY, "balancers": ["magic"]})
    proc = cli("wafer", "sweep", bad)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: sweep.balancers: unknown 'magic'; allowed: none, greedy, topology, ni, ni-eplb"
    ]


def test_recorded_trace_of_another_model_is_rejected_through_the_cli(tmp_path):
    trace = ExpertTrace(counts=np.ones((4, 3, 8), dtype=np.int64), model="tiny", top_k=2, source="engine")
    path = trace.save(tmp_path / "run.npz")
    spec = write(tmp_path, {**TINY, "trace": str(path)})
    proc = cli("wafer", "sweep", spec)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: trace {path}: counts shape (4, 3, 8) does not match the model")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_recorded_draft_layer_is_left_out_of_the_replay(tmp_path):
    """A trace recorded with MTP drafting holds the MTP layer's MoE after the 58 main layers: the sweep
    replays the served model's layers, as it would the same trace without the draft layer."""
    counts = np.random.default_rng(0).integers(0, 64, size=(15, 59, 256))
    with_draft = ExpertTrace(counts, "deepseek-v3", 8, "engine", draft_layers=1)
    rows = []
    for name, trace in {"with": with_draft, "without": with_draft.target()}.items():
        spec = {**TINY, "balancers": ["none"], "trace": str(trace.save(tmp_path / f"{name}.npz"))}
        rows.append(run_sweep(parse_sweep(spec), progress=False))
    assert rows[0] == rows[1] and len(rows[0]) == 1


def test_reproduce_balance_json_has_the_headline_fractions(tmp_path):
    result = runner.invoke(
        app,
        [
            "wafer",
            "reproduce",
            "balance",
            "--json",
            "--iterations",
            "25",
            "--models",
            "deepseek-v3",
            "--out",
            str(tmp_path),
            "--no-curves",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("ni_compute_gain", "ni_comm_gain", "wsc_vs_nvl72_avg_gain"):
        assert isinstance(data[key], float) and -1 < data[key] < 10
    assert data["paper"] == {"ni_compute_gain": 0.54, "ni_comm_gain": 0.22, "wsc_vs_nvl72_avg_gain": 0.39}
    ladder = data["models"]["deepseek-v3"]["ladder"]
    assert [r["rung"] for r in ladder][:3] == ["NVL72", "WSC baseline mapping", "+ER-Mapping"]
    ni = next(r for r in ladder if r["balancer"] == "ni")
    assert ni["stall_s"] == 0.0
    for png in ("balance_load_over_time.png", "balance_ladder.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--scenario", "bursty"], "error: scenario: unknown 'bursty'; allowed: fixed, mixed"),
        (["--models", "gpt-5"], "error: model: unknown preset 'gpt-5'"),
        (["--iterations", "0"], "error: iterations: must be >= 1, got 0"),
    ],
)
def test_reproduce_balance_bad_input_is_one_line_and_exit_2(tmp_path, args, line):
    proc = cli("wafer", "reproduce", "balance", "--out", str(tmp_path), *args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(line)


def test_ray_executor_matches_local(tmp_path):
    ray = pytest.importorskip("ray")
    spec = parse_sweep({**TINY, "iterations": 12})
    local = run_sweep(spec, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_sweep(spec, executor="ray", progress=False)
    finally:
        ray.shutdown()
    assert remote == local


def test_processes_executor_matches_local():
    spec = parse_sweep({**TINY, "iterations": 12})
    assert run_sweep(spec, executor="processes", progress=False) == run_sweep(spec, progress=False)
