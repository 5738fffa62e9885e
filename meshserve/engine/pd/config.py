"""The ``pd`` engine argument: how many prefill and decode instances run behind one engine interface."""

from __future__ import annotations

from meshserve.errors import require

ROLES = ("prefill", "decode")


def parse_pd(spec: str | None) -> dict[str, int]:
    """``"prefill=1,decode=1"`` as {"prefill": 1, "decode": 1}; only one of each runs today."""
    require(isinstance(spec, str) and bool(spec), "pd", f"must be like 'prefill=1,decode=1', got {spec!r}")
    counts: dict[str, int] = {}
    for part in spec.split(","):
        role, _, n = part.partition("=")
        require(
            role.strip() in ROLES and n.strip().isdigit(),
            "pd",
            f"must be like 'prefill=1,decode=1', got {spec!r}",
        )
        counts[role.strip()] = int(n)
    require(
        counts == {"prefill": 1, "decode": 1},
        "pd",
        f"one prefill and one decode instance are supported (prefill=1,decode=1), got {spec!r}",
    )
    return counts
