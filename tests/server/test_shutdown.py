"""SIGTERM under load: every stream still open when the grace period ends gets a final error event and
[DONE] (never a cut connection), the log says how many were cut, and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx

from meshserve.server.serve import free_port

STREAMS = 48


def start(model_dir: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from meshserve.cli import main; main()", "serve", "--model", model_dir]
    cmd += ["--port", str(port), "--max-model-len", "1024", "--max-num-seqs", str(STREAMS)]
    cmd += ["--graceful-shutdown-s", "1", "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None and time.time() < deadline, "server did not come up"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)


def test_sigterm_with_many_long_streams_gives_each_client_a_final_event(model_dir):
    port = free_port()
    proc = start(model_dir, port)
    try:

        async def one(client: httpx.AsyncClient, i: int, first: asyncio.Event, count: list[int]) -> list[str]:
            body = {"prompt": [1, 5 + i], "max_tokens": 1000, "ignore_eos": True, "stream": True}
            events: list[str] = []
            async with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 1:
                            count[0] += 1
                            if count[0] == STREAMS:
                                first.set()
            return events

        async def main() -> list[list[str]]:
            first, count = asyncio.Event(), [0]
            limits = httpx.Limits(max_connections=STREAMS + 8)
            async with httpx.AsyncClient(limits=limits, timeout=120) as client:
                tasks = [asyncio.create_task(one(client, i, first, count)) for i in range(STREAMS)]
                await asyncio.wait_for(first.wait(), 120)  # every stream is under way
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        got = asyncio.run(main())
        assert proc.wait(timeout=60) == 0
        log = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    cut = 0
    for events in got:
        assert events[-1] == "[DONE]", events[-3:]  # the stream ended properly, not mid-way
        last = json.loads(events[-2])
        if "error" in last:
            assert "grace period" in last["error"]["message"] and last["error"]["code"] == 503
            cut += 1
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    assert cut > 0, "no stream outlived the grace period: make them longer"
    assert re.search(rf"grace period of 1 s over, {cut} open request\(s\) cut", log), log[-2000:]
    assert "Traceback" not in log, log[-2000:]
