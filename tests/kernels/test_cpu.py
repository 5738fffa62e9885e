"""Capability tags from faked cpu flags: what kernel tables are keyed by."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshserve.kernels.cpu import isa_tag, machine_key, parse_machine_key, profile_dir

AVX512_BF16 = frozenset({"fma", "avx2", "avx512f", "avx512_bf16"})
AMX = AVX512_BF16 | {"amx_bf16", "amx_tile", "amx_int8"}


@pytest.mark.parametrize(
    ("flags", "arch", "tag"),
    [
        (AMX, "x86_64", "amx_bf16"),
        (AVX512_BF16, "x86_64", "avx512_bf16"),
        (frozenset({"avx2", "avx512f"}), "x86_64", "avx512f"),
        (frozenset({"fma", "avx2"}), "x86_64", "avx2"),
        (frozenset({"sse4_2"}), "x86_64", "generic"),
        (frozenset({"asimd", "asimddp", "bf16", "sve", "i8mm"}), "aarch64", "aarch64+asimddp+bf16+i8mm+sve"),
        (frozenset({"fp", "asimd"}), "aarch64", "aarch64"),
    ],
)
def test_isa_tag_names_the_best_capability(flags, arch, tag):
    assert isa_tag(flags, arch) == tag


def test_amx_off_makes_an_amx_machine_choose_as_avx512(monkeypatch, switch):
    switch("MESHSERVE_AMX", "off")
    assert isa_tag(AMX, "x86_64") == "avx512_bf16"
    switch("MESHSERVE_AMX", "on")
    assert isa_tag(AMX, "x86_64") == "amx_bf16"


def test_machine_key_round_trips_and_rejects_cpu_names():
    key = machine_key(4, AMX, "x86_64")
    assert key == "amx_bf16 / 4 threads" and parse_machine_key(key) == ("amx_bf16", 4)
    assert parse_machine_key("Intel(R) Xeon(R) Processor / 1 threads / torch 2.13.0+cpu") is None
    assert parse_machine_key("avx2") is None


def test_profile_dir_follows_xdg_then_home(monkeypatch, tmp_path, switch):
    switch("MESHSERVE_PROFILE_DIR", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert profile_dir() == tmp_path / "meshserve" / "profiles"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert profile_dir() == Path.home() / ".cache" / "meshserve" / "profiles"
    switch("MESHSERVE_PROFILE_DIR", str(tmp_path / "mine"))
    assert profile_dir() == tmp_path / "mine"
