"""Stop strings over HTTP (matched in the front door, off the engine thread): the choices, their finish
and stop reasons and the usage equal LLM.generate's, streamed or not, for n > 1 and with
include_stop_str_in_output; the stopped requests leave no KV blocks behind."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from meshserve import SamplingParams

PROMPT = "the quick brown fox"
SAMPLED = {"temperature": 1.0, "seed": 11, "n": 3, "max_tokens": 16}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_stopped_choices_and_usage_equal_llm_generate(client, server, offline, stream, include):
    free = offline.generate(PROMPT, SamplingParams(**SAMPLED, ignore_eos=True), use_tqdm=False)[0]
    stop = [c.text[4:6] for c in free.outputs[:2]]
    params = SamplingParams(**SAMPLED, ignore_eos=True, stop=stop, include_stop_str_in_output=include)
    (want,) = offline.generate(PROMPT, params, use_tqdm=False)
    assert any(isinstance(c.stop_reason, str) for c in want.outputs)
    extra = {"ignore_eos": True, "include_stop_str_in_output": include}
    args = {"model": server.model, "prompt": PROMPT, "stop": stop, "extra_body": extra, **SAMPLED}
    got: dict[int, list] = {i: ["", None, None] for i in range(SAMPLED["n"])}
    if stream:
        chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        for chunk in chunks[:-1]:
            for c in chunk.choices:
                got[c.index] = [got[c.index][0] + c.text, c.finish_reason, c.stop_reason]
        usage = chunks[-1].usage
    else:
        out = client.completions.create(**args)
        got = {c.index: [c.text, c.finish_reason, c.stop_reason] for c in out.choices}
        usage = out.usage
    assert [got[i] for i in range(SAMPLED["n"])] == [
        [c.text, c.finish_reason, c.stop_reason] for c in want.outputs
    ]
    assert usage.completion_tokens == sum(len(c.token_ids) for c in want.outputs)
    deadline = time.monotonic() + 5
    while not server.blocks_free and time.monotonic() < deadline:  # aborts land at the engine's next loop
        time.sleep(0.05)
    assert server.blocks_free


def finished_on_stop(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    line = re.search(r'^vllm:request_success_total\{[^}]*finished_reason="stop"[^}]*\} (\S+)$', text, re.M)
    return 0.0 if line is None else float(line.group(1))


def test_a_request_ended_on_a_stop_string_is_counted_as_the_engine_counted_it(client, server, offline):
    free = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].text
    before = finished_on_stop(server)
    for stream in (False, True):
        out = client.completions.create(
            model=server.model, prompt=PROMPT, max_tokens=16, temperature=0, stop=free[5:8], stream=stream
        )
        if stream:
            list(out)
    deadline = time.monotonic() + 5
    while finished_on_stop(server) < before + 2 and time.monotonic() < deadline:  # counted at the abort
        time.sleep(0.05)
    assert finished_on_stop(server) == before + 2
