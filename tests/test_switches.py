"""The environment switches: every variable the package reads is listed in meshserve/switches.py, an
engine reads them once when it starts (the `switches` engine argument over the environment), bad values
name the variable, and `meshserve env` prints them with the kernel paths they choose."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from meshserve import switches
from meshserve.cli import app
from meshserve.config import EngineConfig
from meshserve.engine import LLM, SamplingParams
from meshserve.engine.distributed.torchrun import ENV_VARS
from meshserve.errors import InputError
from meshserve.kernels.attention import attention_backend

PACKAGE = Path(switches.__file__).parent
READS = re.compile(r"""os\.(?:environ(?:\.get)?|getenv)\s*[\[(]\s*["']([A-Z0-9_]+)["']""")
NAMES = re.compile(r"""["'](MESHSERVE_[A-Z0-9_]+)["']""")
CPU = torch.device("cpu")


def test_every_variable_the_package_reads_is_listed():
    listed = set(switches.BY_NAME) | set(switches.FOREIGN) | set(ENV_VARS)
    read, named = set(), set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        read |= set(READS.findall(text))
        named |= set(NAMES.findall(text))
    assert read and named  # the patterns still find what they look for
    assert read - listed == set()
    assert named - listed - {"MESHSERVE_TEST_MARK"} == set()  # the tests' mark on their processes


def test_engine_code_reads_no_switch_per_call():
    """Kernels, models and the engine ask switches.value (installed at engine start), never os.environ,
    for meshserve's switches; they read only other tools' variables (torchrun.py the launcher's)."""
    foreign = set(switches.FOREIGN) | set(ENV_VARS)
    for folder in ("kernels", "models", "engine"):
        for path in (PACKAGE / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                if "os.environ" in line or "getenv" in line:
                    assert path.name == "torchrun.py" or set(READS.findall(line)) & foreign, (path, line)


def test_bad_values_and_names_are_input_errors(monkeypatch):
    monkeypatch.setenv("MESHSERVE_ATTENTION", "trition")
    with pytest.raises(InputError, match="MESHSERVE_ATTENTION: unknown value 'trition'; allowed: auto, "):
        EngineConfig("m")
    monkeypatch.delenv("MESHSERVE_ATTENTION")
    with pytest.raises(InputError, match="MESHSERVE_MOE: unknown value 'fast'; allowed: native, reference"):
        EngineConfig("m", switches={"MESHSERVE_MOE": "fast"})
    with pytest.raises(InputError, match="switches: unknown switch 'MESHSERVE_FUSE'; allowed: MESHSERVE_"):
        EngineConfig("m", switches={"MESHSERVE_FUSE": "reference"})


def test_an_engine_reads_the_switches_once_when_it_starts(tiny_model_dir, monkeypatch):
    model = str(tiny_model_dir("llama"))
    monkeypatch.setenv("MESHSERVE_ATTENTION", "reference")
    with LLM(model, max_model_len=32) as llm:
        assert llm.engine.config.switches["MESHSERVE_ATTENTION"] == "reference"
        monkeypatch.setenv("MESHSERVE_ATTENTION", "triton")  # too late for this engine
        assert attention_backend(CPU, torch.float32) == "reference"
    monkeypatch.setenv("MESHSERVE_ATTENTION", "triton")
    with LLM(model, max_model_len=32, switches={"MESHSERVE_ATTENTION": "reference"}) as llm:
        assert attention_backend(CPU, torch.float32) == "reference"  # the argument over the environment
        assert llm.engine.config.switches["MESHSERVE_FUSED"] == "native"  # the rest from their defaults


def test_meshserve_env_prints_the_switches_and_the_kernel_paths(monkeypatch):
    monkeypatch.setenv("MESHSERVE_ATTENTION", "reference")
    monkeypatch.setenv("MESHSERVE_PROFILE_DIR", "/tmp/h31-nowhere")
    monkeypatch.setenv("MESHSERVE_API_KEY", "sk-never-printed")
    result = CliRunner().invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    for name in [*switches.BY_NAME, *switches.FOREIGN]:
        assert f"  {name}=" in result.output
    assert "MESHSERVE_ATTENTION=reference  [default auto]" in result.output
    assert "MESHSERVE_PROFILE_DIR=/tmp/h31-nowhere" in result.output
    assert "MESHSERVE_API_KEY=(set)" in result.output and "sk-never-printed" not in result.output
    assert "attention cpu float32: reference" in result.output
    assert "attention cuda: reference" in result.output
    assert "native build: " in result.output and "gemm table: " in result.output
    assert "quantized gemm cpu bfloat16: register tiles" in result.output


def test_meshserve_env_refuses_a_bad_switch(monkeypatch):
    monkeypatch.setenv("MESHSERVE_FUSED", "yes")
    result = CliRunner().invoke(app, ["env"])
    assert result.exit_code != 0
    assert "MESHSERVE_FUSED: unknown value 'yes'" in str(result.exception) + result.output


def test_two_engines_in_one_process_each_run_with_their_own(tiny_model_dir, monkeypatch):
    from meshserve.kernels import native
    from meshserve.models import decoder

    assert native.load(), f"native kernels missing: run `{native.BUILD_COMMAND}` (make test does)"
    seen: list[str] = []
    chosen = decoder.attention_backend
    monkeypatch.setattr(decoder, "attention_backend", lambda *args: seen.append(chosen(*args)) or seen[-1])
    model, greedy = str(tiny_model_dir("llama")), SamplingParams(temperature=0, max_tokens=2)
    with (
        LLM(model, max_model_len=32, switches={"MESHSERVE_ATTENTION": "reference"}) as reference,
        LLM(model, max_model_len=32) as native_engine,
    ):
        for llm, want in ((reference, "reference"), (native_engine, "native"), (reference, "reference")):
            seen.clear()
            llm.generate([[1, 5, 9]], greedy, use_tqdm=False)
            assert set(seen) == {want}
