"""A GPTQ checkpoint served over the OpenAI API answers what the same checkpoint gives offline."""

from __future__ import annotations

import openai
import pytest

from meshserve import LLM, SamplingParams
from meshserve.models.quant.export import export_quantized
from tests.server.conftest import ENGINE_ARGS, MODEL, start_server

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def gptq_dir(tiny_model_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("gptq")
    export_quantized(
        tiny_model_dir("llama"), out / "q", out / "r", "gptq", bits=4, group_size=32, desc_act=True
    )
    return str(out / "q")


def test_serve_a_gptq_directory(gptq_dir):
    running = start_server(gptq_dir)
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
        out = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
    finally:
        running.stop()
    assert running.llm.engine.model_config.quantization.method == "gptq"
    (expected,) = LLM(gptq_dir, **ENGINE_ARGS).generate(
        PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), use_tqdm=False
    )
    assert out.choices[0].text == expected.outputs[0].text
