"""Hostile input, disconnecting clients, a full queue and SIGTERM: the server answers 4xx, frees every KV
block and keeps serving (loopback only, bounded in count and time)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

import httpx
import pytest

from meshserve import SamplingParams
from meshserve.server.serve import free_port

OK = {"prompt": "hello", "max_tokens": 2}
HOSTILE = [  # (body, status, param named in the error)
    ({**OK, "max_tokens": "ten"}, 400, "max_tokens"),
    ({**OK, "max_tokens": -1}, 400, "max_tokens"),
    ({**OK, "max_tokens": 10**12}, 400, "max_tokens"),
    ({**OK, "max_tokens": True}, 400, "max_tokens"),
    ({**OK, "temperature": -1}, 400, "temperature"),
    ({**OK, "top_p": 2}, 400, "top_p"),
    ({**OK, "n": 0}, 400, "n"),
    ({**OK, "n": 10**6}, 400, "n"),
    ({**OK, "seed": 2**70}, 400, "seed"),
    ({**OK, "stop": 5}, 400, "stop"),
    ({**OK, "logit_bias": {"999999": 5}}, 400, "logit_bias"),
    ({**OK, "min_tokens": 50}, 400, "min_tokens"),
    ({**OK, "surprise": 1}, 400, "surprise"),
    ({**OK, "prompt": []}, 400, "prompt"),
    ({**OK, "prompt": [1, 10**9]}, 400, "prompt"),
    ({**OK, "prompt": "x " * 100_000}, 400, "prompt"),
    ({**OK, "model": "gpt-5"}, 404, "model"),
    ({"max_tokens": 2}, 400, "prompt"),
]


@pytest.mark.parametrize(("body", "status", "param"), HOSTILE)
def test_hostile_input_gets_4xx_naming_the_field(server, body, status, param):
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    error = r.json()["error"]
    assert r.status_code == status and error["param"] == param and error["code"] == status
    assert param in error["message"] or status == 404
    assert httpx.post(f"{server.url}/v1/completions", json=OK).status_code == 200


def test_prompt_over_max_model_len_says_the_limit(server):
    r = httpx.post(f"{server.url}/v1/completions", json={**OK, "prompt": list(range(1, 200))})
    limit = server.llm.engine.max_model_len
    assert r.status_code == 400 and f"max_model_len={limit}" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("content", "status"),
    [(b"{", 400), (b'{"prompt": "\xff\xfe"}', 400), (b"[1, 2]", 400), (b"x" * (10 << 20), 413)],
)
def test_malformed_bodies(server, content, status):
    headers = {"content-type": "application/json"}
    r = httpx.post(f"{server.url}/v1/completions", content=content, headers=headers)
    assert r.status_code == status and "error" in r.json()
    chat = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "x", "content": "y"}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages[0].role"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_full_waiting_queue_answers_503_with_retry_after(server):
    server.llm.max_waiting = 0
    try:
        r = httpx.post(f"{server.url}/v1/completions", json=OK)
    finally:
        server.llm.max_waiting = None
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert httpx.post(f"{server.url}/v1/completions", json=OK).status_code == 200


def test_200_streams_with_random_disconnects(server, offline):
    """Every stream that stays gets the tokens it gets alone; the KV cache is fully free afterwards."""
    prompts = [[1] + [(7 * i + j) % 500 + 3 for j in range(3 + i % 17)] for i in range(200)]
    params = [
        dict(max_tokens=8, ignore_eos=True, **({"temperature": 0} if i % 2 else {"seed": i}))
        for i in range(200)
    ]
    alone = [o.text for o in offline.generate(prompts, [SamplingParams(**p) for p in params], use_tqdm=False)]
    rng = random.Random(0)
    leave_after = [rng.choice([None, None, 0, 1, 3]) for _ in prompts]  # chunks to read before hanging up

    async def one(client: httpx.AsyncClient, i: int) -> str | None:
        body = {"prompt": prompts[i], "stream": True, **params[i]}
        text, chunks = "", 0
        async with client.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if leave_after[i] is not None and chunks >= leave_after[i]:
                    return None  # hang up mid-stream
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
                    chunks += 1
        return text

    async def main() -> list[str | None]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(len(prompts))))

    got = asyncio.run(main())
    kept = [i for i, text in enumerate(got) if text is not None]
    assert len(kept) > 50 and [got[i] for i in kept] == [alone[i] for i in kept]
    deadline = time.time() + 20
    while not (server.blocks_free and not server.llm.engine.has_unfinished()):
        assert time.time() < deadline, "blocks still held after every client left"
        time.sleep(0.05)
    # The metrics hook runs in the engine thread after a step's outputs are delivered, so read it there,
    # between steps (read from here, it raced the last step's hook: 2 of 200 still tracked, once in 6 runs).
    metrics = server.llm.on_step.__self__
    assert asyncio.run(server.llm.call(lambda engine: metrics.num_tracked)) == 0  # aborted ones forgotten


def test_sigterm_stops_gracefully_with_exit_0(model_dir):
    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        "from meshserve.cli import main; main()",
        "serve",
        "--model",
        model_dir,
        "--port",
        str(port),
        "--max-model-len",
        "64",
        "--uvicorn-log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=OK, timeout=30)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_non_streaming_client_that_hangs_up_frees_its_blocks(server, monkeypatch):
    body = {"prompt": [1, 5, 6, 7], "max_tokens": 90, "n": 8, "ignore_eos": True}
    engine = server.llm.engine
    step = engine.step

    def slow_step(*args, **kwargs):  # >= 5 ms a step: the 90 steps outlast the client's 0.2 s on any machine
        time.sleep(0.005)
        return step(*args, **kwargs)

    monkeypatch.setattr(engine, "step", slow_step)
    steps = engine.num_steps
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.2)
    deadline = time.time() + 10  # far less than the ~90 steps the 8 completions would still need
    while not (server.blocks_free and not server.llm.engine.has_unfinished()):
        assert time.time() < deadline, "the abandoned request still holds blocks"
        time.sleep(0.02)
    assert server.llm.engine.num_steps - steps < 80  # aborted, not run to its 90 tokens
    assert httpx.post(f"{server.url}/v1/completions", json=OK).status_code == 200
