"""The `meshserve generate` door: prompts from a file or stdin, and every bad option is one line
`error: field: ...` with exit code 2 (the draft model's faults named as the draft's)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshserve import __version__
from meshserve.engine import LLM, SamplingParams
from meshserve.testing import run_cli

FAST = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


def generate(model: str, *args: str, stdin: str = ""):
    return run_cli(["generate", "--model", model, "--max-tokens", "5", "--ignore-eos", *args], stdin=stdin)


def expected(model: str, prompts: list[str]) -> str:
    outs = LLM(model, num_kv_blocks=64).generate(prompts, GREEDY, use_tqdm=False)
    return "".join(o.text + "\n" for o in outs)


def test_prompts_from_a_file_one_per_line(model, tmp_path):
    prompts = ["hello world", "the sky is", "one two three"]
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
    result = generate(model, "--prompt-file", str(file))
    assert result.code == 0, result.err
    assert result.out == expected(model, prompts)


def test_prompts_from_stdin(model):
    result = generate(model, "--prompt-file", "-", stdin="hello world\nthe sky is\n")
    assert result.code == 0, result.err
    assert result.out == expected(model, ["hello world", "the sky is"])
    result = generate(model, "--prompt", "-", stdin="hello world")
    assert result.code == 0 and result.out == expected(model, ["hello world"])


def one_line_error(result, field: str) -> str:
    assert result.code == 2, (result.out, result.err)
    assert result.err.startswith(f"error: {field}: ") and result.err.count("\n") == 1, result.err
    assert "Traceback" not in result.err and result.out == ""
    return result.err


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ([], "prompt"),
        (["--prompt", "a", "--prompt-file", "-"], "prompt"),
        (["--prompt-file", "/no/such/file.txt"], "prompt_file"),
        (["--prompt-file", "-"], "prompt_file"),  # empty stdin
        (["--prompt", "hi", "--max-model-len", "1"], "max_model_len"),
        (["--prompt", "hi", "--max-model-len", "99999"], "max_model_len"),
        (["--prompt", "hi", "--dtype", "float64"], "dtype"),
        (["--prompt", "hi", "--speculative-config", "{nope"], "speculative_config"),
        (["--prompt", "hi", "--speculative-config", "[1, 2]"], "speculative_config"),
        (
            ["--prompt", "hi", "--speculative-config", '{"method": "draft_model", "model": "/no/dir"}'],
            "speculative_config.model",
        ),
    ],
)
def test_bad_options_are_one_line_and_exit_2(model, args, field):
    one_line_error(generate(model, *args), field)


def test_a_missing_target_model_is_named_as_the_model():
    one_line_error(run_cli(["generate", "--model", "/no/such/model", "--prompt", "hi"]), "model")


@FAST
@given(
    field=st.sampled_from(["head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings"]),
    value=st.sampled_from([-1, 0, "false", "1e4", None, [], -0.5]),
)
def test_a_broken_draft_model_is_named_as_the_draft(model, tmp_path_factory, field, value):
    if value is None or (field == "tie_word_embeddings" and isinstance(value, bool)):
        return  # null means "use the default": not broken
    draft = shutil.copytree(model, tmp_path_factory.mktemp("draft") / "draft")
    config = json.loads((draft / "config.json").read_text())
    config[field] = value
    (draft / "config.json").write_text(json.dumps(config))
    spec = json.dumps({"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2})
    err = one_line_error(
        generate(model, "--prompt", "hi", "--speculative-config", spec), "speculative_config.model"
    )
    assert f"config.json:{field}" in err and "draft model" in err


def test_version_and_python_dash_m():
    result = run_cli(["--version"])
    assert result.code == 0 and result.out == f"meshserve {__version__}\n"
    proc = subprocess.run(
        [sys.executable, "-m", "meshserve", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout == f"meshserve {__version__}\n"
