"""`meshserve generate` prints the completion; bad input is one line on stderr and exit code 2."""

import sys

import pytest
from typer.testing import CliRunner

from meshserve.cli import app, main
from meshserve.engine import LLM, SamplingParams


def test_generate_prints_the_greedy_completion(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    result = CliRunner().invoke(
        app, ["generate", "--model", model, "--prompt", "hello world", "--max-tokens", "8", "--ignore-eos"]
    )
    assert result.exit_code == 0, result.output
    (expected,) = LLM(model, max_num_seqs=1).generate(
        "hello world", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    assert result.output == expected.text + "\n"


def test_generate_bad_input_is_one_line_and_exit_2(tiny_model_dir, monkeypatch, capsys):
    model = str(tiny_model_dir("llama"))
    argv = ["meshserve", "generate", "--model", model, "--prompt", "hi", "--temperature", "-1"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    expected = "error: temperature: must be [0, 10000] (below 1e-05 = greedy), got -1.0\n"
    assert capsys.readouterr().err == expected


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (
            ["--data-parallel-size", "8", "--enable-expert-parallel"],
            "error: data_parallel_size: expert parallelism needs at least one expert per rank: "
            "8 ranks > 4 experts\n",
        ),
        (
            ["--data-parallel-size", "2", "--enable-expert-parallel", "--eplb-config", '{"mode": "fast"}'],
            "error: mode: unknown 'fast'; allowed: invasive, non-invasive\n",
        ),
    ],
)
def test_generate_parallel_flags_report_bad_values(tiny_model_dir, monkeypatch, capsys, flags, error):
    model = str(tiny_model_dir("mixtral"))
    monkeypatch.setattr(sys, "argv", ["meshserve", "generate", "--model", model, "--prompt", "hi", *flags])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and capsys.readouterr().err == error


def test_a_prompt_file_past_one_calls_bound_runs_in_parts(tiny_model_dir, tmp_path, monkeypatch):
    """LLM.generate keeps at most MAX_CHOICES completions in the engine; a longer file runs in parts."""
    import meshserve.engine.llm as llm_module

    monkeypatch.setattr(llm_module, "MAX_CHOICES", 2)
    model = str(tiny_model_dir("llama"))
    prompts = ["hello world", "the sky is", "a b c", "one two three", "x y"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    flags = ["--prompt-file", str(tmp_path / "prompts.txt"), "--max-tokens", "4", "--ignore-eos"]
    result = CliRunner().invoke(app, ["generate", "--model", model, *flags])
    assert result.exit_code == 0, result.output
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with LLM(model, max_num_seqs=len(prompts)) as llm:
        want = [llm.generate(p, params, use_tqdm=False)[0].text for p in prompts]
    assert result.output.splitlines() == want
