"""The OpenAI API through the official `openai` client against a real server on 127.0.0.1."""

from __future__ import annotations

import httpx
import openai
import pytest

from meshserve import SamplingParams

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def reference(offline, prompt, **params) -> list[str]:
    (out,) = offline.generate(prompt, SamplingParams(**params), use_tqdm=False)
    return [c.text for c in out.outputs]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [server.model]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_completion_text_and_usage(client, server, offline):
    out = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.text for c in out.choices] == reference(
        offline, PROMPT, max_tokens=12, temperature=0, ignore_eos=True
    )
    prompt_tokens = len(offline.tokenizer.encode(PROMPT))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        prompt_tokens,
        12,
        prompt_tokens + 12,
    )
    assert out.choices[0].finish_reason == "length"


def test_streaming_adds_up_and_reports_usage_last(client, server, offline):
    chunks = list(
        client.completions.create(
            model=server.model,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert [text] == reference(offline, PROMPT, max_tokens=10, temperature=0, ignore_eos=True)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-2].choices[0].finish_reason == "length"


def test_chat_completion_and_chat_stream(client, server, offline):
    messages = [{"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0)
    expected = offline.chat(messages, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0].text
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=server.model, messages=messages, max_tokens=8, temperature=0, stream=True
    )
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas) == expected


def test_n2_seeded_is_reproducible_alone_and_in_a_busy_batch(client, server, offline):
    kwargs = {
        "model": server.model,
        "prompt": PROMPT,
        "max_tokens": 10,
        "n": 2,
        "seed": 5,
        "temperature": 1.0,
    }
    alone = [c.text for c in client.completions.create(**kwargs).choices]
    assert alone == reference(offline, PROMPT, max_tokens=10, n=2, seed=5, temperature=1.0)
    busy = [
        client.completions.create(
            model=server.model, prompt=f"busy {i}", max_tokens=30, top_p=0.7, stream=True
        )
        for i in range(6)
    ]
    again = [c.text for c in client.completions.create(**kwargs).choices]
    for stream in busy:
        list(stream)
    assert again == alone


def test_stop_strings_and_logprobs(client, server, offline):
    free = reference(offline, PROMPT, max_tokens=20, temperature=0, ignore_eos=True)[0]
    stop = free[5:8]
    out = client.completions.create(
        model=server.model,
        prompt=PROMPT,
        max_tokens=20,
        temperature=0,
        stop=[stop],
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    choice = out.choices[0]
    assert choice.text == free[: free.index(stop)] and choice.finish_reason == "stop"
    assert len(choice.logprobs.tokens) == out.usage.completion_tokens
    # keyed by token text, as OpenAI's format is: tokens that decode alike share a key
    assert all(
        choice.logprobs.token_logprobs[i] in top.values()
        for i, top in enumerate(choice.logprobs.top_logprobs)
    )


def test_metrics_use_vllm_names(client, server):
    client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4)
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:inter_token_latency_seconds",
        "vllm:prefix_cache_queries_total",
        "vllm:num_preemptions_total",
        'meshserve:step_tokens_count{kind="prefill"',
        # a finished request's phases (its timeline): observed once it ends
        "vllm:request_queue_time_seconds_count{",
        "vllm:request_prefill_time_seconds_count{",
        "vllm:request_decode_time_seconds_count{",
        "vllm:request_inference_time_seconds_count{",
        "meshserve:request_front_time_seconds_count{",
    ):
        assert name in text, name


def test_prompt_logprobs_as_vllm_returns_them(client, server, offline):
    out = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 1}
    )
    ids = offline.tokenizer.encode(PROMPT)
    entries = out.choices[0].model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    assert all(str(t) in e and e[str(t)]["logprob"] <= 0 for t, e in zip(ids[1:], entries[1:], strict=True))
