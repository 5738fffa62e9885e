"""The engine profiles the GEMM shapes its machine has no table for on first use, caches them, and stays
out of the way when told to (MESHSERVE_PROFILE=off) or out of time."""

from __future__ import annotations

import pytest

from meshserve.engine import LLM, SamplingParams, kernel_profile
from meshserve.kernels.profile import GemmTable, machine_id, shape_key, user_table_path
from meshserve.kernels.smooth_gemm import PLAIN

GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


@pytest.fixture
def profile_on(tmp_path, monkeypatch, switch):
    monkeypatch.setattr(kernel_profile, "AUTO_M_POINTS", (1, 4))  # small and quick: tests time nothing
    switch("MESHSERVE_PROFILE", "on")
    switch("MESHSERVE_PROFILE_DIR", str(tmp_path))


def start(path, **args) -> LLM:
    return LLM(str(path), dtype="bfloat16", max_num_batched_tokens=8, max_num_seqs=4, **args)


def test_first_start_measures_the_models_shapes_and_later_starts_reuse_them(
    tiny_model_dir, profile_on, monkeypatch, capsys
):
    path = tiny_model_dir("mixtral")
    llm = start(path)
    cached = GemmTable.load(user_table_path())
    assert cached.machine == machine_id()
    shapes = {shape_key(*s) for s in kernel_profile.linear_shapes(llm.engine.model)}
    experts = {f"bmm:{e}x{n}x{k}" for e, n, k in kernel_profile.expert_shapes(llm.engine.model)}
    assert shapes | experts <= set(cached.gemm["bfloat16"])
    assert "profiling GEMMs" in capsys.readouterr().err  # the progress bar
    first = llm.generate(["hello world"], GREEDY)[0].outputs[0].token_ids

    def no_profile(*args, **kwargs):
        raise AssertionError("a cached shape was profiled again")

    monkeypatch.setattr(kernel_profile, "profile_shape", no_profile)
    monkeypatch.setattr(kernel_profile, "profile_bmm", no_profile)
    again = start(path)
    assert again.generate(["hello world"], GREEDY)[0].outputs[0].token_ids == first


def test_profile_off_or_out_of_time_measures_nothing(tiny_model_dir, profile_on, monkeypatch, switch):
    switch("MESHSERVE_PROFILE", "off")
    start(tiny_model_dir("llama"))
    assert not user_table_path().exists()
    switch("MESHSERVE_PROFILE", "on")
    monkeypatch.setattr(kernel_profile, "AUTO_SECONDS", -1.0)
    start(tiny_model_dir("llama"))
    assert not user_table_path().exists()


def test_a_given_kernel_profile_is_used_as_is(tiny_model_dir, profile_on, tmp_path):
    table = tmp_path / "mine.json"
    GemmTable({"bfloat16": {"*": [(1, PLAIN)]}}, "test box").save(table)
    start(tiny_model_dir("llama"), kernel_profile=str(table))
    assert not user_table_path().exists()


def test_a_shape_the_budget_ran_out_in_is_left_to_a_later_start(tiny_model_dir, profile_on, monkeypatch):
    path = tiny_model_dir("llama")
    real = kernel_profile.profile_shape
    calls = []

    def out_of_time_after_one(*args, **kwargs):
        calls.append(args[:2])
        return real(*args, **kwargs) if len(calls) == 1 else []  # what a passed deadline returns

    monkeypatch.setattr(kernel_profile, "profile_shape", out_of_time_after_one)
    llm = start(path)
    cached = set(GemmTable.load(user_table_path()).gemm["bfloat16"])
    assert cached == {shape_key(*calls[0])}
    monkeypatch.setattr(kernel_profile, "profile_shape", real)
    start(path)  # the next start measures the rest
    shapes = {shape_key(*s) for s in kernel_profile.linear_shapes(llm.engine.model)}
    assert shapes <= set(GemmTable.load(user_table_path()).gemm["bfloat16"])
