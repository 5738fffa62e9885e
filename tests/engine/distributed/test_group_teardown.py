"""A rank's process groups end with destroy_process_group: no gloo thread of theirs outlives them.

Under torchrun, rank 0 (the server's process) used to abort in C++ at exit now and then, after its
server had finished and its engine had closed ("terminate called without an active exception"): its
default group was still alive, gloo threads running, while the interpreter shut down. torch imports
torch._dynamo (and with it torch.distributed's FSDP and sharded-tensor modules) the first time a model is
built on the meta device; imported after the group exists, they keep a reference to it that
destroy_process_group does not drop. ``join`` imports them first. A fresh interpreter each, as a rank is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[3]
RANK = """
import gc, os, sys
import torch, torch.distributed as dist
from meshserve.config import EngineConfig
from meshserve.engine.distributed.worker import RankSpec, join

join(RankSpec(0, 1, 0, sys.argv[1], EngineConfig(sys.argv[2]), None, None, 1, 60.0))
with torch.device("meta"):  # as the engine builds its model: torch imports torch._dynamo here
    torch.nn.Embedding(8, 4)
torch.distributed.all_reduce(torch.ones(2))
dist.destroy_process_group()
gc.collect()
tasks = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(" ".join(sorted(t for t in tasks if "gloo" in t)) or "none")
"""


def test_a_rank_leaves_no_gloo_thread_once_its_groups_are_destroyed(tmp_path, tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    run = subprocess.run(
        [sys.executable, "-c", RANK, rendezvous, str(tiny_model_dir("llama"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["none"], f"gloo threads left: {run.stdout}"
