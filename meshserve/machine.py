"""What the machine has to give: memory the OS reports available, for sizing checks of both halves."""

from __future__ import annotations


def available_memory() -> int:
    """Bytes the OS says are available (Linux MemAvailable; 4 GiB if unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30
