"""Process memory: the heap's free pages go back to the OS once a model is loaded and packed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import meshserve.engine.engine as engine_module
from meshserve.engine import Engine
from meshserve.models.layers.moe import StackedExperts

HOLES = """
import ctypes, json
from meshserve.memory import release_free_heap, rss_mib

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 100 << 10  # under glibc's mmap threshold: heap blocks, as a load's packing temporaries are
blocks = [libc.malloc(size) for _ in range(2000)]
for b in blocks:
    ctypes.memset(b, 1, size)
for b in blocks[::2]:  # every other one freed: 100 MiB of holes between live blocks, resident
    libc.free(b)
before = rss_mib()
print(json.dumps({"released": bool(release_free_heap()), "mib": before - rss_mib()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc")
def test_free_heap_pages_go_back_to_the_os():
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(HOLES)], capture_output=True, text=True, check=True
    )
    r = json.loads(run.stdout.splitlines()[-1])
    assert r["released"] and r["mib"] > 80, r


def test_an_engine_hands_back_the_heap_once_its_weights_are_packed(tiny_model_dir, monkeypatch):
    calls = []
    model = {}

    def release() -> bool:  # what the model holds when the engine lets the heap go
        experts = [m for m in model["lm"].modules() if isinstance(m, StackedExperts)]
        calls.append(all(m.packed is not None for m in experts) and len(experts) > 0)
        return True

    build = engine_module.build_model
    monkeypatch.setattr(engine_module, "build_model", lambda *a: model.setdefault("lm", build(*a)))
    monkeypatch.setattr(engine_module, "release_free_heap", release)
    Engine.from_args(str(tiny_model_dir("mixtral")), max_num_seqs=2)
    assert calls == [True]  # once, after the experts were packed
