"""The server's malloc settings: a step's activations are reused from the heap, not faulted in afresh."""

import subprocess
import sys

import pytest

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
