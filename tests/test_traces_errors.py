"""The trace door: a damaged, truncated or foreign trace file is `error: trace FILE: ...`, no traceback."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshserve.cli import main
from meshserve.errors import InputError
from meshserve.traces import ExpertTrace

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    counts = np.random.default_rng(0).integers(0, 9, size=(4, 2, 8))
    path = ExpertTrace(counts=counts, model="m", top_k=2, source="test").save(
        tmp_path_factory.mktemp("trace") / "good.npz"
    )
    return path.read_bytes()


def expect_trace_error(path) -> InputError:
    with pytest.raises(InputError) as err:
        ExpertTrace.load(path)
    assert err.value.field == f"trace {path}"
    return err.value


@FAST
@given(cut=st.floats(0.0, 0.99))
def test_a_truncated_trace_is_refused(tmp_path, good_bytes, cut):
    path = tmp_path / "cut.npz"
    path.write_bytes(good_bytes[: int(len(good_bytes) * cut)])
    expect_trace_error(path)


@FAST
@given(data=st.data())
def test_a_corrupted_trace_loads_intact_or_is_refused(tmp_path, good_bytes, data):
    damaged = bytearray(good_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] ^= data.draw(st.integers(1, 255))
    path = tmp_path / "flipped.npz"
    path.write_bytes(bytes(damaged))
    try:
        trace = ExpertTrace.load(path)
    except InputError as err:
        assert err.field == f"trace {path}"
    else:  # a flip in a part nobody checks (zip comment, padding): the data must still be valid
        assert trace.counts.ndim == 3 and trace.counts.min() >= 0


def save_npz(path, **arrays):
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    return path


HEADER = {"format_version": 1, "model": "m", "top_k": 2, "source": "test"}
FOREIGN = {
    "no meta": lambda p: save_npz(p, counts=np.zeros((1, 1, 4), np.int64)),
    "meta not JSON": lambda p: save_npz(p, counts=np.zeros((1, 1, 4), np.int64), meta=np.array("{oops")),
    "meta a list": lambda p: save_npz(p, counts=np.zeros((1, 1, 4), np.int64), meta=np.array("[1]")),
    "no top_k": lambda p: save_npz(
        p, counts=np.zeros((1, 1, 4), np.int64), meta=np.array(json.dumps({**HEADER, "top_k": None}))
    ),
    "top_k NaN": lambda p: save_npz(
        p, counts=np.zeros((1, 1, 4), np.int64), meta=np.array(json.dumps({**HEADER, "top_k": float("nan")}))
    ),
    "float counts": lambda p: save_npz(
        p, counts=np.full((1, 1, 4), np.nan), meta=np.array(json.dumps(HEADER))
    ),
    "negative counts": lambda p: save_npz(
        p, counts=-np.ones((1, 1, 4), np.int64), meta=np.array(json.dumps(HEADER))
    ),
    "2-D counts": lambda p: save_npz(p, counts=np.ones((1, 4), np.int64), meta=np.array(json.dumps(HEADER))),
    "object counts": lambda p: save_npz(
        p, counts=np.array([None, 1], dtype=object), meta=np.array(json.dumps(HEADER))
    ),
    "future version": lambda p: save_npz(
        p, counts=np.zeros((1, 1, 4), np.int64), meta=np.array(json.dumps({**HEADER, "format_version": 9}))
    ),
    "a plain .npy": lambda p: np.save(p.open("wb"), np.zeros(3)),
    "text": lambda p: p.write_text("steps,layer,expert\n1,2,3\n"),
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("kind", FOREIGN)
def test_a_foreign_or_malformed_file_is_refused(tmp_path, kind):
    path = tmp_path / "trace.npz"
    FOREIGN[kind](path)
    expect_trace_error(path)


def test_the_cli_reports_a_bad_trace_as_one_line_exit_2(tmp_path, good_bytes, monkeypatch, capsys):
    trace = tmp_path / "bad.npz"
    trace.write_bytes(good_bytes[:100])
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"models: [deepseek-v3]\nplatforms: [wsc-8x8]\ntp: [4]\nbatch: [8]\nbalancers: [none]\n"
        f"iterations: 2\ntrace: {trace}\n"
    )
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["meshserve", "wafer", "sweep", str(spec), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"error: trace {trace}: ") and err.count("\n") == 1
    assert not out.exists()
