"""Process memory: the heap's free pages go back to the OS once a model is loaded and packed, and the
server's malloc settings reuse a step's activations from the heap instead of faulting them in afresh."""

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


# Allocate, touch and free a 1 MiB buffer 50 times in a non-main thread (as the engine thread does its
# steps) and print the minor page faults that took.
CHURN = """
import ctypes, resource, sys, threading
from meshserve.memory import pin_malloc_thresholds
assert pin_malloc_thresholds()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def churn():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        p = libc.malloc(1 << 20)
        ctypes.memset(p, 1, 1 << 20)
        libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=churn)
t.start()
t.join()
print(faults[0])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_pinned_thresholds_reuse_freed_buffers_without_page_faults() -> None:
    out = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, check=True)
    faults = int(out.stdout.split()[-1])
    # One buffer is 256 pages: faulting each time would be 12,800; reused, only the first faults in.
    assert faults < 2 * 256, f"{faults} page faults for 50 reuses of a 1 MiB buffer"
