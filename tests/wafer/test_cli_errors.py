"""The `meshserve wafer` door: misspelt or non-finite preset fields, bad flags, unwritable outputs and
problems too big for memory are one line `error: field: ...` with exit code 2, before any work, leaving
no file behind."""

from __future__ import annotations

import re
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshserve.testing import run_cli
from meshserve.wafer.presets import PRESET_DIR

FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PRESETS = {"hardware": "wsc-4x8x8", "model": "deepseek-v3"}
FOLDER = {"hardware": "hardware", "model": "models"}


def one_line_error(result, field: str) -> str:
    """The run failed with exit 2 and one line naming ``field`` (a regular expression)."""
    assert result.code == 2, (result.out, result.err)
    assert re.match(f"error: {field}: ", result.err) and result.err.count("\n") == 1, result.err
    assert "Traceback" not in result.err + result.out
    return result.err


def keys(data: dict, prefix: tuple = (), sections: bool = True) -> list[tuple]:
    """Paths to every key of a nested preset mapping (sections too, unless sections=False)."""
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            out += [(*prefix, key)] * sections + keys(value, (*prefix, key), sections)
        else:
            out.append((*prefix, key))
    return out


def parent_of(data: dict, path: tuple) -> dict:
    for key in path[:-1]:
        data = data[key]
    return data


def write_edited(tmp_path, kind: str, edit) -> tuple[str, dict]:
    data = yaml.safe_load((PRESET_DIR / FOLDER[kind] / f"{PRESETS[kind]}.yaml").read_text())
    edit(data)
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path), data


def simulate(kind: str, path: str):
    return run_cli(["wafer", "simulate", f"--{kind}", path, "--tp", "4"])


@FAST
@given(kind=st.sampled_from(["hardware", "model"]), data=st.data(), typo=st.sampled_from(["s", "_", "x"]))
def test_a_misspelt_field_is_refused_not_ignored(tmp_path, kind, data, typo):
    misspelt = []

    def add_misspelt_copy(preset):  # the right key stays, so only the unknown-key check can catch it
        path = data.draw(st.sampled_from([p for p in keys(preset) if p[-1] not in ("name", "description")]))
        parent = parent_of(preset, path)
        parent[path[-1] + typo] = parent[path[-1]]
        misspelt.append(".".join((preset["name"], *path[:-1], path[-1] + typo)))

    path, _ = write_edited(tmp_path, kind, add_misspelt_copy)
    assert "unknown field (misspelt?)" in one_line_error(simulate(kind, path), re.escape(misspelt[0]))


def test_a_misspelt_wafers_section_no_longer_simulates_one_wafer(tmp_path):
    path, _ = write_edited(tmp_path, "hardware", lambda d: d.update(wafer=d.pop("wafers")))
    err = one_line_error(simulate("hardware", path), "wsc-4x8x8.wafer")
    assert "unknown field (misspelt?)" in err and "wafers" in err


@FAST
@given(
    kind=st.sampled_from(["hardware", "model"]),
    data=st.data(),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
)
def test_non_finite_numbers_in_presets_are_refused(tmp_path, kind, data, bad):
    poisoned = []

    def poison(preset):
        fields = [p for p in keys(preset, sections=False) if p[-1] not in ("name", "description", "kind")]
        path = data.draw(st.sampled_from(fields))
        parent_of(preset, path)[path[-1]] = bad
        poisoned.append(".".join((preset["name"], *path)))

    path, _ = write_edited(tmp_path, kind, poison)
    one_line_error(simulate(kind, path), re.escape(poisoned[0]))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-3"])
def test_non_finite_or_non_positive_flags_are_refused(value):
    one_line_error(run_cli(["wafer", "simulate", "--tokens-per-device", value]), "tokens_per_device")


def test_reproduce_balance_names_an_unknown_time_model(tmp_path):
    args = ["wafer", "reproduce", "balance", "--time-model", "exact", "--out", str(tmp_path / "o")]
    assert "fair-share" in one_line_error(run_cli(args), "time_model")


@pytest.fixture
def blocker(tmp_path):
    """A plain file, so that any path under it cannot be created."""
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["wafer", "heatmap", "--out", "{blocked}/heat.png"],
        ["wafer", "reproduce", "comm", "--out", "{blocked}/out"],
        [
            "wafer",
            "reproduce",
            "balance",
            "--iterations",
            "2",
            "--models",
            "deepseek-v3",
            "--out",
            "{blocked}/o",
        ],
        ["wafer", "sweep", str(PRESET_DIR / "sweeps" / "example.yaml"), "--out", "{blocked}/sweep"],
        ["demo", "--out", "{blocked}/demo"],
    ],
)
def test_an_unwritable_output_fails_within_a_second_and_writes_nothing(blocker, command):
    start = time.perf_counter()
    result = run_cli([a.format(blocked=blocker) for a in command])
    assert time.perf_counter() - start < 1.0
    one_line_error(result, "out")
    assert sorted(p.name for p in blocker.parent.iterdir()) == ["a-file"]


def test_heatmap_out_must_be_a_png(tmp_path):
    err = one_line_error(run_cli(["wafer", "heatmap", "--out", str(tmp_path / "heat.svg")]), "out")
    assert ".png" in err and not list(tmp_path.iterdir())


def test_a_failed_run_leaves_no_partial_result_set(tmp_path, monkeypatch):
    from meshserve.wafer import sweep

    def broken_plot(rows, out):
        raise RuntimeError("plotting crashed")

    monkeypatch.setattr(sweep, "plot_sweep", broken_plot)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "models: [deepseek-v3]\nplatforms: [wsc-8x8]\ntp: [4]\nbatch: [8]\nbalancers: [none]\niterations: 2\n"
    )
    with pytest.raises(RuntimeError):
        sweep.sweep_command(str(spec), out=str(tmp_path / "out"))
    assert not any(p.is_file() for p in tmp_path.rglob("*") if p != spec)


def test_presets_lists_every_bundled_preset():
    result = run_cli(["wafer", "presets"])
    assert result.code == 0, result.err
    for path in [*(PRESET_DIR / "hardware").glob("*.yaml"), *(PRESET_DIR / "models").glob("*.yaml")]:
        assert path.stem in result.out
