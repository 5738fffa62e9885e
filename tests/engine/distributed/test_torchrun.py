"""Ranks started by torchrun (env:// rendezvous, commands over torch.distributed): rank 0's LLM and
``meshserve generate`` give the single-process engine's tokens, and nothing is left running after."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from meshserve.engine import LLM
from meshserve.engine.distributed.worker import FAULT_ENV
from meshserve.server.serve import free_port
from tests.engine.distributed.helpers import GREEDY, SINGLE

REPO = Path(__file__).parents[3]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ONE_HOST = ["--standalone", "--nproc-per-node", "2"]


def torchrun(*args: str, ok: bool = True, timeout_s: float = 240.0) -> subprocess.CompletedProcess:
    """torchrun with 2 ranks on this host (see ``torchruns``)."""
    [run] = torchruns([*ONE_HOST, *args], ok=ok, timeout_s=timeout_s)
    return run


def torchruns(
    *launches: list[str], ok: bool = True, timeout_s: float = 240.0
) -> list[subprocess.CompletedProcess]:
    """One torchrun agent per launch, all at once: killed whole if they overrun, and checked to leave no
    process behind (their ranks run in sessions of their own, so they are found by a mark in their
    environment) and each to exit 0 (``ok``) or not."""
    mark = f"meshserve-test-{uuid.uuid4()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MESHSERVE_TEST_MARK": mark}
    procs = [
        subprocess.Popen(
            [*TORCHRUN, *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for args in launches
    ]
    try:
        outputs = [proc.communicate(timeout=timeout_s) for proc in procs]
    except subprocess.TimeoutExpired:
        for pid in [*(proc.pid for proc in procs), *marked(mark)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in procs:
            proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout_s:.0f} s")
    assert not marked(mark), "a rank outlived torchrun"
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert (proc.returncode == 0) == ok, err[-3000:]
    return [
        subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        for proc, (out, err) in zip(procs, outputs, strict=True)
    ]


def marked(mark: str, *variables: str) -> list[int]:
    """Live processes whose environment holds ``mark`` (and each NAME=VALUE of ``variables``; Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours
            environ = (entry / "environ").read_bytes().split(b"\0")
            found = any(mark.encode() in item for item in environ)
            if entry.name.isdigit() and found and all(v.encode() in environ for v in variables):
                pids.append(int(entry.name))
    return pids


def test_torchrun_ranks_match_one_process_while_experts_migrate(mixtral, expected):
    run = torchrun(str(REPO / "tests/engine/distributed/torchrun_generate.py"), mixtral)
    [line] = run.stdout.splitlines()  # only rank 0 gets past LLM(...)
    result = json.loads(line)
    assert result["ranks"] == "TorchrunRanks"  # rank 0 of torchrun's launch, not ranks of its own
    assert result["rounds"] == [expected] * 3
    assert result["migrations"] >= 1, "no migration switched in; the test would not cover the switch"


def test_meshserve_generate_under_torchrun(mixtral, tmp_path):
    prompts = ["the quick brown fox", "hello there", "a b c d"]
    with LLM(mixtral, **SINGLE) as one:
        want = [o.text for o in one.generate(prompts, GREEDY, use_tqdm=False)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    run = torchrun(
        "-m",
        "meshserve",
        "generate",
        "--model",
        mixtral,
        "--prompt-file",
        str(tmp_path / "prompts.txt"),
        "--max-tokens",
        str(GREEDY.max_tokens),
        "--ignore-eos",
        "--max-model-len",
        "128",
        "--data-parallel-size",
        "2",
        "--enable-expert-parallel",
    )
    assert run.stdout.splitlines() == want


def test_two_hosts_meet_at_a_rendezvous_endpoint(mixtral, tmp_path):
    """What several hosts run (one torchrun agent per host, a c10d rendezvous endpoint), here as two
    agents of one rank each on loopback: rank 0, on whichever agent it lands, prints one process's tokens."""
    prompts = ["the quick brown fox", "a b c d"]
    with LLM(mixtral, **SINGLE) as one:
        want = [o.text for o in one.generate(prompts, GREEDY, use_tqdm=False)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    port = free_port()
    host = [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        uuid.uuid4().hex,
        "-m",
        "meshserve",
        "generate",
        "--model",
        mixtral,
        "--prompt-file",
        str(tmp_path / "prompts.txt"),
        "--max-tokens",
        str(GREEDY.max_tokens),
        "--ignore-eos",
        "--max-model-len",
        "128",
        "--data-parallel-size",
        "2",
        "--enable-expert-parallel",
    ]
    runs = torchruns(host, host)
    assert "".join(run.stdout for run in runs).splitlines() == want


def test_a_torchrun_rank_that_fails_to_start_stops_every_rank(mixtral, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "start:1")
    run = torchrun(
        "-m",
        "meshserve",
        "generate",
        "--model",
        mixtral,
        "--prompt",
        "hi",
        "--max-tokens",
        "4",
        "--data-parallel-size",
        "2",
        "--enable-expert-parallel",
        ok=False,
    )
    assert "RankError: rank 1 failed during start: RuntimeError: injected start failure" in run.stderr


def test_torchrun_environment_and_a_world_size_that_disagrees(mixtral, monkeypatch):
    from meshserve.engine.distributed.torchrun import Launch, torchrun_launch
    from meshserve.errors import InputError

    assert torchrun_launch() is None  # pytest was not started by torchrun
    env = {
        "RANK": "0",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert torchrun_launch() == Launch(rank=0, world_size=4, local_rank=0, local_world_size=2)
    with pytest.raises(InputError, match=r"data_parallel_size: must equal torchrun's WORLD_SIZE \(4\)"):
        LLM(mixtral, data_parallel_size=2, enable_expert_parallel=True)


@pytest.mark.parametrize("signalled", ["torchrun", "rank 0"])
def test_a_server_under_torchrun_stops_rank_0_first_without_a_traceback(mixtral, signalled):
    """SIGTERM to torchrun reaches every rank at once; to rank 0 (the server's process), only it. Either
    way rank 0 stops accepting, drains and then closes rank 1, which waited: no rank dies first, nothing
    prints a gloo error or a traceback, and with rank 0 signalled torchrun exits 0, even when closing the
    ranks outlasts the server's wait for its engine (rank 0 used to exit mid-close), and rank 0 does not
    abort at exit (its default group outlived it: test_group_teardown.py). (Signalled itself, torchrun
    ends with its own SignalException traceback and status 1: the launcher's, not ours.)"""
    port, mark = free_port(), f"meshserve-test-{uuid.uuid4()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MESHSERVE_TEST_MARK": mark}
    if signalled == "rank 0":  # closing the ranks outlasts the server's 10 s wait, as on a loaded host
        env[FAULT_ENV] = "close:0"
    proc = subprocess.Popen(
        [
            *TORCHRUN,
            *ONE_HOST,
            "-m",
            "meshserve",
            "serve",
            "--model",
            mixtral,
            "--port",
            str(port),
            "--max-model-len",
            "128",
            "--data-parallel-size",
            "2",
            "--enable-expert-parallel",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while not _healthy(port):
            assert proc.poll() is None and time.time() < deadline, "the server did not come up"
            time.sleep(0.5)
        if signalled == "torchrun":
            proc.send_signal(signal.SIGTERM)
        else:
            [rank_0] = [pid for pid in marked(mark, "RANK=0") if pid != proc.pid]
            os.kill(rank_0, signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        for pid in [proc.pid, *marked(mark)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not marked(mark), "a rank outlived torchrun"
    rank_1_went_first = ("had stopped before rank 0 closed them", "Connection closed", "rank 0 is gone")
    assert not [sign for sign in rank_1_went_first if sign in err], err[-3000:]
    if signalled == "torchrun":
        assert "rank 1: SIGTERM: rank 0 drains, then closes this rank" in err, err[-3000:]
        assert err.count("Traceback") == 1 and "SignalException: Process" in err, err[-3000:]
        assert "meshserve" not in err[err.index("Traceback") :], err[-3000:]
    else:
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
