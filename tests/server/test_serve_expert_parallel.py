"""`meshserve serve --data-parallel-size 2 --enable-expert-parallel --enable-eplb`: the OpenAI client gets the
single-process engine's greedy completions (concurrent and streamed, while experts migrate), and SIGTERM
stops the server and both rank processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from meshserve import LLM, SamplingParams
from meshserve.server.serve import free_port

PROMPTS = ["the quick brown fox", "hello", "a b c d e f g", "once upon a time there was"]
EPLB = {"window_size": 2, "step_interval": 2, "num_redundant_experts": 2, "chunk_bytes": 1 << 14}


def child_pids(pid: int) -> list[int]:
    """Direct children of a live process (Linux /proc)."""
    return [
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]


def running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while True:
        assert proc.poll() is None and time.time() < deadline, "server did not come up"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


def test_two_rank_server_matches_one_process_and_stops_cleanly(tiny_model_dir):
    model = str(tiny_model_dir("mixtral"))
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(model, max_model_len=64, max_num_batched_tokens=16, max_num_seqs=4, block_size=4) as one:
        expected = [o.text for o in one.generate(PROMPTS, greedy, use_tqdm=False)]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-c",
        "from meshserve.cli import main; main()",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--max-model-len",
        "64",
        "--max-num-batched-tokens",
        "16",
        "--max-num-seqs",
        "4",
        "--block-size",
        "4",
        "--uvicorn-log-level",
        "warning",
        "--data-parallel-size",
        "2",
        "--enable-expert-parallel",
        "--enable-eplb",
        "--eplb-config",
        json.dumps(EPLB),
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE)
    ranks: list[int] = []
    try:
        wait_healthy(proc, url, timeout_s=300)
        ranks = [p for p in child_pids(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(ranks) == 2
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)

        def complete(prompt: str) -> str:
            out = client.completions.create(
                model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
            )
            return out.choices[0].text

        for _ in range(2):  # the second round serves on the placement the first one's loads planned
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                assert list(pool.map(complete, PROMPTS)) == expected
        stream = client.completions.create(
            model=model,
            prompt=PROMPTS[0],
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        assert "".join(c.choices[0].text for c in stream if c.choices) == expected[0]
        assert "vllm:kv_cache_usage_perc" in httpx.get(f"{url}/metrics", timeout=10).text

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.time() + 10
        while any(map(running, ranks)):
            assert time.time() < deadline, "rank processes outlived the server"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in ranks:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
