"""The ``pd`` engine argument: how many prefill and decode instances run behind one engine interface, and
their names (what /admin/role, /metrics and PDEngine.stats call them)."""

from __future__ import annotations

from meshserve.engine.pd.policy import RolePolicy
from meshserve.errors import require

ROLES = ("prefill", "decode")
MAX_INSTANCES = 16  # processes one front end starts: each loads the model


def parse_pd(spec: str | None) -> tuple[dict[str, int], RolePolicy | None]:
    """``"prefill=2,decode=1"`` as {"prefill": 2, "decode": 1}, and with ``",switch=HIGH:LOW"`` the automatic
    role policy (policy.py)."""
    form = "must be like 'prefill=1,decode=1' or 'prefill=2,decode=1,switch=8:2'"
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
        set(counts) == set(ROLES) and min(counts.values()) >= 1,
        "pd",
        f"needs at least one prefill and one decode instance, got {spec!r}",
    )
    total = sum(counts.values())
    require(total <= MAX_INSTANCES, "pd", f"at most {MAX_INSTANCES} instances in all, got {total}")
    return counts, policy


def instance_names(counts: dict[str, int]) -> dict[str, list[str]]:
    """Each role's instances: "prefill" and "decode" when alone, else "prefill0", "prefill1", ..."""
    return {
        role: [role] if counts[role] == 1 else [f"{role}{i}" for i in range(counts[role])] for role in ROLES
    }
