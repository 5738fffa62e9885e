"""What this CPU can do, as the tags kernel tables are keyed by, and where this machine's measurements live.

Tables are keyed by capability (ISA tag and thread count), never by the CPU's name string: one name
("Intel(R) Xeon(R) Processor") covers machines with and without AMX, whose fastest kernels differ.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch

from meshserve import switches
from meshserve.switches import profile_dir  # noqa: F401  (this machine's measured tables live there)

# x86 tags, best first: the first one the CPU has names it.
X86_TAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
# aarch64 extensions (/proc/cpuinfo "Features") that change which kernel wins; the tag lists those present.
ARM_EXTENSIONS = ("asimddp", "bf16", "i8mm", "sve", "sve2")
AMX_FLAGS = frozenset({"amx_bf16", "amx_tile", "amx_int8"})


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 "flags", aarch64 "Features" in /proc/cpuinfo); empty where unreadable."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(
        word for ln in lines if ln.startswith(("flags", "Features")) for word in ln.split(":", 1)[-1].split()
    )


def amx_allowed() -> bool:
    """MESHSERVE_AMX=off makes an AMX machine choose (and profile) as if it had none, to measure both."""
    return switches.value("MESHSERVE_AMX") == "on"


def has_amx(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return amx_allowed() and {"amx_bf16", "amx_tile"} <= flags


def isa_tag(flags: frozenset[str] | None = None, arch: str | None = None) -> str:
    """The capability that decides the fastest kernels here: e.g. "amx_bf16", "avx2", "aarch64+bf16+sve"."""
    flags = cpu_flags() if flags is None else flags
    arch = platform.machine() if arch is None else arch
    if arch in ("aarch64", "arm64"):
        return "+".join(["aarch64", *(ext for ext in ARM_EXTENSIONS if ext in flags)])
    if not amx_allowed():
        flags = flags - AMX_FLAGS
    return next((tag for tag in X86_TAGS if tag in flags), "generic")


def machine_key(
    threads: int | None = None, flags: frozenset[str] | None = None, arch: str | None = None
) -> str:
    """What a kernel table is valid for: ISA tag and torch threads, e.g. "avx512_bf16 / 2 threads"."""
    threads = torch.get_num_threads() if threads is None else threads
    return f"{isa_tag(flags, arch)} / {threads} threads"


def parse_machine_key(key: str) -> tuple[str, int] | None:
    """(isa tag, threads) of a machine_key string; None for anything else (e.g. an old name-keyed table)."""
    isa, sep, rest = key.partition(" / ")
    threads = rest.removesuffix(" threads")
    if not sep or not threads.isdigit() or " " in isa:
        return None
    return isa, int(threads)
