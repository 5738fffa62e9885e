"""GEMM profile tables: round trip, lookup by shape and M, the 3% guard, and the `profile` command."""

from __future__ import annotations

import json
import time

import pytest
import torch

from meshserve.errors import InputError
from meshserve.kernels import cpu
from meshserve.kernels.cpu import parse_machine_key
from meshserve.kernels.profile import (
    SHIPPED_GEMM_TABLE,
    GemmTable,
    candidates,
    load_gemm_table,
    machine_id,
    machine_table,
    profile_bmm,
    profile_gemm,
    profile_shape,
    shipped_tables,
    user_table_path,
)
from meshserve.kernels.smooth_gemm import PLAIN, GemmChoice

TABLE = {
    "version": 1,
    "machine": "test box",
    "gemm": {
        "bfloat16": {
            "*": [[512, "packed_f32", 1], [8, "packed", 1]],
            "96x64": [[4, "linear", 1], [64, "packed_f32", 16]],
        },
        "float32": {"*": [[1, "linear", 1]]},
    },
}


def test_table_round_trips_through_its_file(tmp_path):
    table = GemmTable.from_json(TABLE)
    table.save(tmp_path / "gemm.json")
    again = GemmTable.load(tmp_path / "gemm.json")
    assert again.to_json() == table.to_json()
    assert again.rows("1x1", torch.bfloat16)[0] == (8, GemmChoice("packed"))  # rows come back sorted by M


def test_lookup_by_shape_then_default_then_plain():
    table = GemmTable.from_json(TABLE)
    by_m = table.by_m("96x64", torch.bfloat16, max_m=100)
    assert len(by_m) == 101
    assert by_m[1] == by_m[4] == PLAIN
    assert by_m[5] == by_m[64] == by_m[100] == GemmChoice("packed_f32", 16)  # past the last row: the last row
    other = table.by_m("32x64", torch.bfloat16, max_m=9)  # shape not listed: "*"
    assert other[8] == GemmChoice("packed") and other[9] == GemmChoice("packed_f32")
    assert set(GemmTable({}).by_m("8x8", torch.float32, 4)) == {PLAIN}  # nothing for the dtype: F.linear


@pytest.mark.parametrize(
    "bad",
    [
        {"version": 2, "gemm": {}},
        {"version": 1},
        {"version": 1, "gemm": {"float32": {"*": [[4, "cublas", 1]]}}},
        {"version": 1, "gemm": {"float32": {"*": [[0, "linear", 1]]}}},
    ],
)
def test_bad_tables_raise_input_error(tmp_path, bad):
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(InputError) as err:
        GemmTable.load(path)
    assert err.value.field == "kernel_profile"


def test_shipped_tables_are_keyed_by_capability_not_by_cpu_name():
    for table in shipped_tables():
        assert parse_machine_key(table.machine), f"{table.machine!r} is not '<isa tag> / <n> threads'"
    assert GemmTable.load(SHIPPED_GEMM_TABLE).machine == "avx512_bf16 / 1 threads"


def _select(monkeypatch, flags: set[str], threads: int) -> GemmTable:
    """load_gemm_table as an x86 machine with these cpu flags and torch threads would run it."""
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    return load_gemm_table()


def test_a_table_is_chosen_by_isa_and_threads(tmp_path, monkeypatch, switch):
    switch("MESHSERVE_PROFILE_DIR", str(tmp_path))
    shipped = GemmTable.load(SHIPPED_GEMM_TABLE)
    avx512 = {"avx2", "avx512f", "avx512_bf16"}
    # the shipped table's own machine kind
    assert _select(monkeypatch, avx512, 1).to_json() == shipped.to_json()
    # same ISA, another thread count: the nearest shipped table stands in until this machine is measured
    assert _select(monkeypatch, avx512, 2).gemm == shipped.gemm
    # AMX (the same CPU name string on clouds) or a plainer ISA: no stand-in, F.linear everywhere
    for flags in (avx512 | {"amx_bf16", "amx_tile"}, {"avx2"}):
        table = _select(monkeypatch, flags, 1)
        assert table.gemm == {} and set(table.by_m("512x256", torch.bfloat16, 8)) == {PLAIN}
    # unless AMX is switched off: then the AVX-512 table serves
    switch("MESHSERVE_AMX", "off")
    assert _select(monkeypatch, avx512 | {"amx_bf16", "amx_tile"}, 1).gemm == shipped.gemm


def test_this_machines_cached_shapes_win_over_the_stand_in(tmp_path, monkeypatch, switch):
    switch("MESHSERVE_PROFILE_DIR", str(tmp_path))
    flags = {"avx2", "avx512f", "avx512_bf16"}
    _select(monkeypatch, flags, 2)
    mine = GemmTable.from_json({**TABLE, "machine": machine_id()})
    mine.save(user_table_path())
    assert user_table_path().name == "gemm-avx512_bf16-2t.json"
    table = _select(monkeypatch, flags, 2)
    assert table.rows("96x64", torch.bfloat16) == mine.rows("96x64", torch.bfloat16)
    assert table.rows("512x256", torch.bfloat16) == GemmTable.load(SHIPPED_GEMM_TABLE).rows(
        "512x256", torch.bfloat16
    )
    # a table measured with another thread count, or on another ISA, is not this machine's
    assert machine_table("avx512_bf16 / 4 threads") is None
    assert machine_table("amx_bf16 / 2 threads") is None
    # a broken cache file is re-measured, not fatal
    user_table_path().write_text("{")
    assert _select(monkeypatch, flags, 2).gemm == GemmTable.load(SHIPPED_GEMM_TABLE).gemm


def test_profile_stops_at_its_deadline_and_leaves_the_rest_to_f_linear():
    # M = 1 is measured; M = 2^20, predicted from it, would end long past the deadline.
    soon, huge = time.monotonic() + 30, 1 << 20
    rows = profile_shape(32, 16, torch.bfloat16, max_m=huge, reps=1, m_points=(1,), deadline=soon)
    assert rows[-1] == (huge, PLAIN)
    rows = profile_bmm(2, 16, 8, torch.bfloat16, max_m=huge, reps=1, m_points=(1,), deadline=soon)
    assert rows[-1] == (huge, PLAIN) and time.monotonic() < soon


def test_a_shape_the_deadline_left_unmeasured_gets_no_rows():
    # An empty row list is not cached, so the stand-in serves the shape until a later start measures it
    # (F.linear rows would hide the stand-in for good: Llama-3.2-1B's lm_head on its first start).
    assert profile_shape(32, 16, torch.bfloat16, max_m=64, reps=1, deadline=time.monotonic() - 1) == []
    assert profile_bmm(2, 16, 8, torch.bfloat16, max_m=64, reps=1, deadline=time.monotonic() - 1) == []


def test_profile_picks_a_measured_choice_per_m_and_guards_against_slower_ones():
    lines = []
    table = profile_gemm([(32, 16)], [torch.bfloat16], max_m=8, reps=1, report=lines.append)
    rows = table.rows("32x16", torch.bfloat16)
    assert rows[-1][0] == 8 and table.machine == machine_id()
    assert any("slowest chosen / F.linear" in line for line in lines)


def test_native_kernels_are_candidates_for_bfloat16_only():
    bf16 = {c.kernel for c in candidates(torch.bfloat16, 64)}
    assert {"bf16_fma", "dpbf16", "brgemm", "packed_f32", "linear"} <= bf16
    assert {c.kernel for c in candidates(torch.float32, 64)} == {"linear", "packed"}
    assert all(
        c.tile == 1 for c in candidates(torch.bfloat16, 64) if c.kernel in ("bf16_fma", "dpbf16", "brgemm")
    )


def test_profile_command_writes_this_machines_table(tiny_model_dir, tmp_path, switch):
    from typer.testing import CliRunner

    from meshserve.cli import app

    switch("MESHSERVE_PROFILE_DIR", str(tmp_path))
    before = torch.get_num_threads()
    try:
        args = ["--dtype", "float32", "--max-tokens", "4", "--reps", "1", "--num-threads", "1"]
        result = CliRunner().invoke(app, ["profile", "--model", str(tiny_model_dir("llama")), *args])
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    assert "slowest chosen / F.linear" in result.output
    table = GemmTable.load(tmp_path / f"gemm-{cpu.isa_tag()}-1t.json")
    assert table.machine == machine_id().replace(f"{before} threads", "1 threads")
    # qkv, o, gate_up, down and lm_head of the tiny Llama
    assert {"128x64", "64x64", "256x64", "64x128", "512x64"} <= set(table.gemm["float32"])


def test_profile_command_refuses_bad_input(tiny_model_dir):
    from typer.testing import CliRunner

    from meshserve.cli import app

    result = CliRunner().invoke(app, ["profile", "--model", str(tiny_model_dir("llama")), "--dtype", "int8"])
    assert isinstance(result.exception, InputError) and result.exception.field == "dtype"


def test_profile_covers_moe_experts_in_bfloat16_only():
    table = profile_gemm([], [torch.float32, torch.bfloat16], max_m=4, reps=1, bmm_shapes=[(2, 16, 8)])
    assert "bmm:2x16x8" in table.gemm["bfloat16"] and "bmm:2x16x8" not in table.gemm["float32"]
    assert {c.kernel for _, c in table.rows("bmm:2x16x8", torch.bfloat16)} <= {"linear", "packed_f32"}


def test_profile_runs_after_a_served_step_left_its_staging_buffers_in_inference_mode():
    """The engine's first-use profile can run in a process whose earlier engine served steps: the shared
    staging buffers were then made under inference mode, and a profile outside it could not write them."""
    from meshserve.kernels.smooth_gemm import STAGING

    with torch.inference_mode():  # what a served step leaves behind (K = 24: no other test's shape)
        for dtype in (torch.bfloat16, torch.float32):
            STAGING.get(128, 24, dtype)
    assert profile_shape(32, 24, torch.bfloat16, max_m=64, reps=1)
    assert profile_bmm(2, 32, 24, torch.bfloat16, max_m=64, reps=1)
