"""Process memory: what a model will take (checked before allocating), keeping glibc from growing the heap
under a long-running engine, and reading RSS."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, fields

from meshserve.errors import InputError

M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 64 << 20


def pin_malloc_thresholds(mmap: int = MMAP_THRESHOLD, trim: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds (as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ do) for a
    long-running engine: a step's tensors come from the heap and are reused by the next step, and the heap
    need not grow past the peak working set.

    Left alone, glibc raises both thresholds each time a large block is freed, so the heap creeps up
    towards the peak working set over the whole run. A low mmap threshold (64 KiB, as this once was) returns
    memory at once, but then every activation over 64 KiB is a fresh mmap: its pages fault in zeroed and
    munmap returns them, about a thousand page faults per step of a 28M model (a 256-token prefill step
    took 67 ms instead of 43), and benchmarks/soak.py's RSS grew as much with it (+32% over 800 requests,
    against +31% with these thresholds: oneDNN's per-shape caches, docs/engine.md). Tensors above ``mmap``
    (32 MiB, glibc's maximum) are still mmapped; free space over ``trim`` at the heap's top goes back to the
    OS. Returns False where there is no glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim(0)``): loading and packing free many
    temporaries of a few MiB from the heap, and the holes they leave below live blocks stay resident (100 MiB
    after a 1.35B MoE's experts are packed) until something reuses them. Returns False where there is no
    glibc, or nothing was released."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.malloc_trim(0))


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


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes that loading and serving a model will hold at once: every field is resident together."""

    weights: int = 0
    kernel_copies: int = 0  # weights the kernels keep in another layout beside the loaded ones
    kv_cache: int = 0
    draft: int = 0  # the speculative draft model's weights

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def check_memory(need: MemoryNeed, available: int, field: str) -> None:
    """Refuse (InputError on ``field``) when ``need`` is more than ``available`` bytes, naming each part."""
    if need.total <= available:
        return
    parts = ", ".join(
        f"{_size(getattr(need, f.name))} of {f.name.replace('_', ' ')}"
        for f in fields(need)
        if getattr(need, f.name)
    )
    raise InputError(
        field,
        f"needs {_size(need.total)} ({parts}), more than the {_size(available)} this machine has available",
    )


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.2f} MiB"
