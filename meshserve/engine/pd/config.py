"""The ``pd`` engine argument: how many prefill and decode instances run behind one engine interface."""

from __future__ import annotations

from meshserve.engine.pd.policy import RolePolicy
from meshserve.errors import require

ROLES = ("prefill", "decode")


def parse_pd(spec: str | None) -> tuple[dict[str, int], RolePolicy | None]:
    """``"prefill=1,decode=1"`` as {"prefill": 1, "decode": 1} (only one of each runs today), and with
    ``",switch=HIGH:LOW"`` the automatic role policy (policy.py)."""
    form = "must be like 'prefill=1,decode=1' or 'prefill=1,decode=1,switch=8:2'"
    require(isinstance(spec, str) and bool(spec), "pd", f"{form}, got {spec!r}")
    counts: dict[str, int] = {}
    policy = None
    for part in spec.split(","):
        key, _, value = (p.strip() for p in part.partition("="))
        if key == "switch":
            high, _, low = value.partition(":")
            require(high.isdigit() and low.isdigit(), "pd", f"{form}, got {spec!r}")
            policy = RolePolicy(int(high), int(low))
            continue
        require(key in ROLES and value.isdigit(), "pd", f"{form}, got {spec!r}")
        counts[key] = int(value)
    require(
        counts == {"prefill": 1, "decode": 1},
        "pd",
        f"one prefill and one decode instance are supported (prefill=1,decode=1), got {spec!r}",
    )
    return counts, policy
