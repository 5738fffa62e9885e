"""Process memory: keep glibc from growing the heap under a long-running engine, and read RSS."""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)


def pin_mmap_threshold(size: int = 64 << 10) -> bool:
    """Fix glibc's mmap threshold (as MALLOC_MMAP_THRESHOLD_ does) so large tensors always go back to the OS.

    By default glibc raises the threshold each time a large block is freed, so later tensors of that size
    come from the heap, which only grows: RSS creeps up towards the peak working set of the run (a few
    hundred MiB here) without any leak. Returns False where there is no glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, size))


def rss_mib() -> float:
    """Resident memory of this process (Linux /proc; NaN elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
