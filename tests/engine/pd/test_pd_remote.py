"""Instances started on their own (``meshserve serve --role prefill|decode``) and a front end that connects
to them (``--pd-connect``): tokens equal the mixed engine's; "close" ends both processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshserve.config import EngineConfig
from meshserve.engine.pd.remote import connect
from meshserve.errors import InputError
from meshserve.server.serve import free_port
from tests.engine.pd.workload import ARGS, GREEDY, PROMPTS, mixed_tokens

REPO = Path(__file__).parents[3]


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", num_hidden_layers=2))


def start(model: str, role: str, rendezvous: str, listen: str) -> subprocess.Popen:
    flags = ["--max-model-len", "128", "--max-num-seqs", "4", "--block-size", "4"]
    flags += ["--max-num-batched-tokens", "16", "--num-threads", "1"]
    flags += ["--speculative-config", json.dumps(ARGS["speculative_config"])]
    command = [sys.executable, "-m", "meshserve", "serve", "--model", model, "--role", role]
    command += ["--kv-rendezvous", rendezvous, "--listen", listen, "--api-key", "k", *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_front_end_over_instances_started_on_their_own(model):
    expected = mixed_tokens(model, PROMPTS[:3])
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    listen = {role: f"127.0.0.1:{free_port()}" for role in ("prefill", "decode")}
    procs = [start(model, role, rendezvous, where) for role, where in listen.items()]
    try:
        config = EngineConfig.from_args(model, **ARGS)
        spec = f"prefill={listen['prefill']},decode={listen['decode']}"
        pd = None
        for _ in range(600):  # each instance listens once it has loaded and met the other
            try:
                pd = connect(config, spec, "k")
                break
            except InputError:
                assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
                time.sleep(0.2)
        assert pd is not None
        assert [o.token_ids for o in pd.generate(PROMPTS[:3], GREEDY, timeout_s=120)] == expected
        pd.close()
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_the_connections_need_a_key(model):
    with pytest.raises(InputError, match="needs a key"):
        connect(EngineConfig.from_args(model, **ARGS), "prefill=127.0.0.1:1,decode=127.0.0.1:2", None)
