"""Model ids resolve in the local Hugging Face cache (its real layout, built here); nothing is downloaded."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from meshserve.cli import app
from meshserve.engine import LLM, SamplingParams
from meshserve.errors import InputError
from meshserve.models.hub import resolve_model
from meshserve.models.loader import load_config

COMMIT, OLD = "a" * 40, "b" * 40


@pytest.fixture
def cache(tiny_model_dir, tmp_path, monkeypatch):
    """HF_HOME with Org/Tiny at two snapshots: main -> COMMIT (files as symlinks into blobs), v1 -> OLD."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "hub" / "models--Org--Tiny"
    source = tiny_model_dir("llama")
    (repo / "blobs").mkdir(parents=True)
    for commit in (COMMIT, OLD):
        (repo / "snapshots" / commit).mkdir(parents=True)
    for file in source.iterdir():  # huggingface_hub keeps files once, as blobs, linked from each snapshot
        blob = repo / "blobs" / file.name
        shutil.copy(file, blob)
        (repo / "snapshots" / COMMIT / file.name).symlink_to(blob)
        shutil.copy(file, repo / "snapshots" / OLD / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(OLD + "\n")
    return repo


def test_an_id_resolves_to_its_snapshot_by_branch_tag_or_commit(cache, tmp_path, monkeypatch):
    assert resolve_model("Org/Tiny") == cache / "snapshots" / COMMIT
    assert resolve_model("Org/Tiny", revision="v1") == cache / "snapshots" / OLD
    assert resolve_model("Org/Tiny", revision=OLD) == cache / "snapshots" / OLD
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # wins over HF_HOME
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    assert resolve_model("Org/Tiny") == cache / "snapshots" / COMMIT
    config, _ = load_config("Org/Tiny")
    assert config.name == "Org/Tiny"


def test_a_missing_model_says_where_it_looked(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="models--Org--Other/refs/main .*HF_HUB_OFFLINE.*downloads nothing"):
        resolve_model("Org/Other")
    with pytest.raises(InputError, match="at revision 'v2'"):
        resolve_model("Org/Tiny", revision="v2")
    with pytest.raises(InputError, match="is not a directory"):
        resolve_model("no-such-dir")
    with pytest.raises(InputError, match="Org/Name") as err:
        resolve_model(str(cache), revision="main")  # a directory has no revisions
    assert err.value.field == "revision"


def test_generate_runs_a_cached_model_id(cache, tiny_model_dir):
    args = ["generate", "--model", "Org/Tiny", "--prompt", "hello world", "--max-tokens", "6", "--ignore-eos"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (expected,) = LLM(str(tiny_model_dir("llama")), max_num_seqs=1).generate(
        "hello world", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False
    )
    assert result.output == expected.text + "\n"
    result = CliRunner().invoke(app, [*args, "--revision", "nope"])  # main() prints it as one line
    assert isinstance(result.exception, InputError) and "at revision 'nope'" in str(result.exception)
