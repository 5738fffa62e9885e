"""`meshserve generate --quantization int8` quantizes at load: the same text as LLM(quantization="int8")."""

import sys

import pytest
from typer.testing import CliRunner

from meshserve.cli import app, main
from meshserve.engine import LLM, SamplingParams


def test_generate_int8_prints_the_quantized_models_completion(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    args = ["generate", "--model", model, "--prompt", "hello world", "--max-tokens", "8", "--ignore-eos"]
    result = CliRunner().invoke(app, [*args, "--quantization", "int8"])
    assert result.exit_code == 0, result.output
    (expected,) = LLM(model, max_num_seqs=1, quantization="int8").generate(
        "hello world", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    assert result.output == expected.text + "\n"


def test_unknown_quantization_is_one_line_and_exit_2(tiny_model_dir, monkeypatch, capsys):
    model = str(tiny_model_dir("llama"))
    argv = ["meshserve", "generate", "--model", model, "--prompt", "hi", "--quantization", "fp8"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    expected = (
        "error: quantization: unsupported 'fp8'; allowed: gptq, awq, compressed-tensors, int8, int4 "
        "(None: the checkpoint's own)\n"
    )
    assert capsys.readouterr().err == expected


def test_no_quantize_lm_head_keeps_the_head_float(tiny_model_dir):
    model = str(tiny_model_dir("llama", tie_word_embeddings=True))
    args = ["generate", "--model", model, "--prompt", "hello world", "--max-tokens", "8", "--ignore-eos"]
    result = CliRunner().invoke(app, [*args, "--quantization", "int4", "--no-quantize-lm-head"])
    assert result.exit_code == 0, result.output
    with LLM(model, max_num_seqs=1, quantization="int4", quantize_lm_head=False) as llm:
        assert type(llm.engine.model.lm_head).__name__ == "SmoothLinear"
        (expected,) = llm.generate(
            "hello world", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
        )
    assert result.output == expected.text + "\n"


def test_quantize_lm_head_without_quantization_is_refused(tiny_model_dir, monkeypatch, capsys):
    model = str(tiny_model_dir("llama"))
    argv = ["meshserve", "generate", "--model", model, "--prompt", "hi", "--quantize-lm-head"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert "quantize_lm_head: needs quantization" in capsys.readouterr().err
