"""One OpenAI endpoint in front of a prefill and a decode process (``pd="prefill=1,decode=1"``): completions,
streamed or not, equal the mixed engine's greedy tokens, and /metrics shows each role's queue, KV use and
KV transfers."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from meshserve import LLM, SamplingParams
from tests.server.conftest import ENGINE_ARGS, start_server

ARGS = {**ENGINE_ARGS, "speculative_config": {"method": "ngram", "num_speculative_tokens": 3}}
PROMPTS = [
    [1, 20, 21, 22, 23, 24, 25, 26, 27, 28],
    [1, 7, 8, 9, 7, 8, 9, 7, 8],
    [1, 20, 21, 22, 23, 24, 25, 40],
]


@pytest.fixture(scope="module")
def pd_server(model_dir):
    running = start_server(model_dir, pd="prefill=1,decode=1", **ARGS)
    yield running
    running.stop()
    running.llm.shutdown()


def test_completions_through_the_pair_equal_mixed(model_dir, pd_server):
    with LLM(model_dir, **ARGS) as llm:
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        expected = [o.text for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    client = openai.OpenAI(base_url=f"{pd_server.url}/v1", api_key="none", max_retries=0)
    for prompt, text in zip(PROMPTS, expected, strict=True):
        done = client.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
        assert done.choices[0].text == text
        stream = client.completions.create(
            model="tiny-llama",
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        assert "".join(c.choices[0].text for c in stream) == text


def test_metrics_show_each_role(pd_server):
    client = openai.OpenAI(base_url=f"{pd_server.url}/v1", api_key="none", max_retries=0)
    client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=4)
    text = httpx.get(f"{pd_server.url}/metrics").text
    for role in ("prefill", "decode"):
        assert f'meshserve:pd_kv_cache_usage_perc{{model_name="tiny-llama",role="{role}"}}' in text
    assert 'meshserve:pd_transfer_bytes{model_name="tiny-llama",role="decode"}' in text


def test_admin_switches_a_role_live_and_tokens_stay(model_dir, pd_server):
    with LLM(model_dir, **ARGS) as llm:
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        expected = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].text
    client = openai.OpenAI(base_url=f"{pd_server.url}/v1", api_key="none", max_retries=0)
    for role in ("mixed", "prefill"):
        answer = httpx.post(f"{pd_server.url}/admin/role", json={"instance": "prefill", "role": role})
        assert answer.status_code == 200 and answer.json()["roles"]["prefill"] == role
        done = client.completions.create(
            model="tiny-llama",
            prompt=PROMPTS[0],
            max_tokens=10,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert done.choices[0].text == expected
    bad = httpx.post(f"{pd_server.url}/admin/role", json={"instance": "decode", "role": "prefill"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "role"


def test_a_stop_string_ends_the_request_on_the_pair_as_on_one_engine(model_dir, pd_server):
    """The front door ends a completion on its stop string and aborts it in the engine by completion index:
    the pair takes that abort (it once raised TypeError in the engine thread, so the request ran on)."""
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with LLM(model_dir, **ARGS) as llm:
        full = llm.generate(PROMPTS[:1], greedy, use_tqdm=False)[0].text
        assert len(full) >= 6
        stop = full[3:5]
        stopping = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=[stop])
        expected = llm.generate(PROMPTS[:1], stopping, use_tqdm=False)[0].text
    client = openai.OpenAI(base_url=f"{pd_server.url}/v1", api_key="none", max_retries=0)
    done = client.completions.create(
        model="tiny-llama",
        prompt=PROMPTS[0],
        max_tokens=10,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "stop"
    assert asyncio.run(pd_server.llm.call(lambda engine: engine.abort("gone", 0))) is False


def test_n_seeded_completions_through_the_pair_equal_mixed(model_dir, pd_server):
    params = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=6, ignore_eos=True)
    with LLM(model_dir, **ARGS) as llm:
        expected = [c.text for c in llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs]
    client = openai.OpenAI(base_url=f"{pd_server.url}/v1", api_key="none", max_retries=0)
    done = client.completions.create(
        model="tiny-llama",
        prompt=PROMPTS[0],
        n=2,
        seed=3,
        temperature=0.8,
        max_tokens=6,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in sorted(done.choices, key=lambda c: c.index)] == expected
