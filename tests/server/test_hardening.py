"""No single request can stop, starve or fool the server (issue 29): every hostile body below gets a 4xx
naming its field, or a response without NaN/Inf; after each one the server still serves and /health is 200."""

from __future__ import annotations

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshserve.engine.engine as engine_module
from meshserve.engine.sampling_params import MAX_CHOICES
from meshserve.memory import rss_mib
from meshserve.server.app import MAX_BODY_BYTES

OK = {"prompt": "hello", "max_tokens": 2}
JSON = {"content-type": "application/json"}
FAST = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def still_serving(server) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.post(f"{server.url}/v1/completions", json=OK, timeout=30).status_code == 200


def post(server, path: str, body: dict) -> httpx.Response:
    """POST JSON with ASCII escapes, so lone surrogates ("\\ud800") travel as a real client sends them."""
    return httpx.post(f"{server.url}/v1/{path}", content=json.dumps(body), headers=JSON, timeout=60)


def strict_json(text: str) -> object:
    """JSON as the spec has it: NaN, Infinity and -Infinity are refused."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a response: {text[:300]}")

    return json.loads(text, parse_constant=refuse)


def chunked(size: int, piece: int = 1 << 20):
    """A body sent without Content-Length (transfer-encoding: chunked)."""
    yield b'{"prompt": "'
    for _ in range(size // piece):
        yield b"x" * piece
    yield b'", "max_tokens": 2}'


def test_a_chunked_upload_past_the_limit_is_refused_and_its_memory_returned(server):
    still_serving(server)
    before = rss_mib()
    r = httpx.post(f"{server.url}/v1/completions", content=chunked(40 << 20), headers=JSON, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    assert str(MAX_BODY_BYTES) in r.json()["error"]["message"]
    assert rss_mib() - before < 100
    small = httpx.post(f"{server.url}/v1/completions", content=chunked(30, 10), headers=JSON, timeout=30)
    assert small.status_code == 200, small.text  # a chunked body within the limit is served
    still_serving(server)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_long_text_is_refused_by_characters_before_tokenizing(server, endpoint):
    text = "x " * 1_000_000  # 2 MB: under the body limit
    body = (
        {"prompt": text, "max_tokens": 2}
        if endpoint == "completions"
        else {"messages": [{"role": "user", "content": text}], "max_tokens": 2}
    )
    path = "completions" if endpoint == "completions" else "chat/completions"
    before = rss_mib()
    r = httpx.post(f"{server.url}/v1/{path}", json=body, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == ("prompt" if endpoint == "completions" else "messages")
    assert "characters is too long" in error["message"]
    assert rss_mib() - before < 100
    still_serving(server)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ["a"] * (MAX_CHOICES + 1)}, "prompt"),
        ({"prompt": ["a"] * 5, "n": MAX_CHOICES // 4}, "prompt"),
        ({"prompt": "a", "stop": ["s"] * 17}, "stop"),
        ({"prompt": "a", "stop_token_ids": [10**6]}, "stop_token_ids"),
        ({"prompt": "a", "stop_token_ids": [1] * 2000}, "stop_token_ids"),
        ({"prompt": "a", "logit_bias": {str(i): 1 for i in range(2000)}}, "logit_bias"),
        ({"prompt": "a", "top_k": 2**70}, "top_k"),
        ({"prompt": "a", "temperature": 1e300}, "temperature"),
        ({"prompt": "a", "repetition_penalty": 1e-45}, "repetition_penalty"),
        ({"prompt": "a", "repetition_penalty": 1e300}, "repetition_penalty"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"prompt": ["fine", "bad \udfff"]}, "prompt"),
        ({"prompt": "a", "stop": ["\ud800"]}, "stop"),
    ],
)
def test_bounded_lists_and_values_name_the_field(server, body, param):
    r = post(server, "completions", {"max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text[:300]
    still_serving(server)


@pytest.mark.parametrize("content", ["\ud800", "ok \udc00 ok", [{"type": "text", "text": "\udbff"}]])
def test_text_that_cannot_be_encoded_is_one_400_on_chat(server, content):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    r = post(server, "chat/completions", body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages[0].content"
    assert "messages[0].content: is not valid Unicode" in error["message"]
    still_serving(server)


def test_a_near_zero_temperature_is_greedy_over_http(server):
    body = {"prompt": [1, 17, 42, 99], "max_tokens": 8, "ignore_eos": True}
    greedy = httpx.post(f"{server.url}/v1/completions", json={**body, "temperature": 0}).json()
    tiny = httpx.post(f"{server.url}/v1/completions", json={**body, "temperature": 1e-40}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


NUMBERS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([5e-324, 1e-45, 1e-40, 1e-6, 0.0, -0.0, 1e38, 3.5e38, 1e308, -1e308]),
)


@FAST
@given(
    field=st.sampled_from(
        ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]
    ),
    value=NUMBERS,
    stream=st.booleans(),
    chat=st.booleans(),
)
def test_numeric_extremes_never_give_nan_inf_or_a_5xx(server, field, value, stream, chat):
    base = (
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 5}
        if chat
        else {"prompt": "hi", "logprobs": 5}
    )
    body = {**base, "max_tokens": 3, "min_tokens": 2, "stream": stream, field: value}
    path = "chat/completions" if chat else "completions"
    r = httpx.post(f"{server.url}/v1/{path}", json=body, timeout=60)
    assert r.status_code in (200, 400), r.text[:300]
    if r.status_code == 400:
        assert r.json()["error"]["param"] == field
    elif stream:
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            assert "error" not in strict_json(event), event
    else:
        strict_json(r.text)
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_request_failing_in_a_step_fails_alone(server, monkeypatch):
    """A failure inside the step (here: sampling of seed 666 raises) ends that request with a 500 or a
    final error event; the requests beside it and all later ones are served, and /health stays 200."""
    real = engine_module.sample

    def flaky(logits, params, seeds, positions):
        if any(p.seed == 666 for p in params):
            raise OverflowError("injected")
        return real(logits, params, seeds, positions)

    monkeypatch.setattr(engine_module, "sample", flaky)
    bad = {"prompt": "hi", "max_tokens": 4, "temperature": 0.7, "seed": 666}
    r = httpx.post(f"{server.url}/v1/completions", json=bad, timeout=30)
    assert r.status_code == 500 and "OverflowError: injected" in r.json()["error"]["message"]
    streamed = httpx.post(f"{server.url}/v1/completions", json={**bad, "stream": True}, timeout=30)
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert "injected" in strict_json(events[-2])["error"]["message"] and events[-1] == "[DONE]"
    still_serving(server)
    assert server.blocks_free


def test_models_does_not_disclose_the_servers_path(server, model_dir):
    body = httpx.get(f"{server.url}/v1/models").text
    assert model_dir not in body and "/" not in json.loads(body)["data"][0]["root"]


def test_no_nan_or_inf_even_for_a_banned_token_logprob(server):
    """-inf logprobs (a token banned by min_tokens) are reported as -9999.0, as vLLM does."""
    vocab = server.llm.engine.model_config.vocab_size
    body = {"prompt": "hi", "max_tokens": 2, "min_tokens": 2, "logprobs": 20, "stop_token_ids": [3]}
    body["logit_bias"] = {str(t): -100 for t in range(4, min(vocab, 4 + 1000))}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200
    strict_json(r.text)
    assert math.isfinite(min(min(t.values()) for t in r.json()["choices"][0]["logprobs"]["top_logprobs"]))


def test_slow_heads_and_stalled_bodies_are_not_held_forever(server, monkeypatch):
    import socket

    import meshserve.server.app as app_module
    import meshserve.server.serve as serve_module

    monkeypatch.setattr(serve_module, "HEADER_TIMEOUT_S", 0.3)
    monkeypatch.setattr(app_module, "BODY_TIMEOUT_S", 0.3)
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as slow_head:
        slow_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
        assert slow_head.recv(1024) == b""  # closed by the server
    with socket.create_connection((host, int(port)), timeout=10) as slow_body:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        slow_body.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"prompt": ')  # then nothing
        reply = b""
        while not reply.endswith(b"}}"):
            reply += slow_body.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and b'"param":"body"' in reply
    still_serving(server)


def test_the_default_served_name_is_the_base_name_and_the_path_still_answers(model_dir, monkeypatch):
    """`meshserve serve --model /a/b/dir` shows "dir"; clients that send the path as model still work."""
    import asyncio
    import signal

    import meshserve.server.serve as serve_module

    answers = []

    class Asking:  # stands in for uvicorn: asks the app while serve() would be serving, then returns
        def __init__(self, config, grace_s, cut) -> None:
            self.app = config.app

        def run(self) -> None:
            answers.append(asyncio.run(ask(self.app)))

    async def ask(app) -> tuple[dict, int, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            models = (await client.get("/v1/models")).json()
            by_path = await client.post("/v1/completions", json={**OK, "model": model_dir})
            other = await client.post("/v1/completions", json={**OK, "model": "/etc/passwd"})
            return models, by_path.status_code, other.status_code

    monkeypatch.setattr(serve_module, "graceful_server", Asking)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # leave pytest's handlers alone
    serve_module.serve(model_dir, max_model_len=32, block_size=4)  # shuts its engine down on return
    ((models, by_path, other),) = answers
    card = models["data"][0]
    assert card["id"] == card["root"] == model_dir.rstrip("/").split("/")[-1] and "/" not in json.dumps(card)
    assert by_path == 200 and other == 404


def test_a_stream_may_last_longer_than_the_body_timeout(server, monkeypatch):
    """The body timeout covers reading the body; a stream then waits for the client's disconnect with no
    limit (it cut every stream of a loaded benchmark at 30 s with a 408 raised mid-response)."""
    import time

    import meshserve.server.app as app_module

    monkeypatch.setattr(app_module, "BODY_TIMEOUT_S", 0.3)
    step = server.llm.engine.step

    def slow_step():
        time.sleep(0.05)
        return step()

    monkeypatch.setattr(server.llm.engine, "step", slow_step)
    body = {"model": server.model, "prompt": [1, 5, 6], "max_tokens": 12, "ignore_eos": True, "stream": True}
    start = time.monotonic()
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert time.monotonic() - start > 0.3 * 2  # 12 steps of 50 ms: well past the body timeout
    assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
    assert len(lines) - 1 >= 12  # a chunk per step, none cut
