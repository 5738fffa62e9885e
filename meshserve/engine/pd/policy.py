"""When an instance of a prefill/decode pair changes role by itself: thresholds with hysteresis.

Decode-heavy (the decode instance runs >= ``high`` requests while the prefill queue is <= ``low``): the
prefill instance turns mixed and decodes its own requests; it turns back to prefill once the decode batch
is <= ``low``. Prompt-heavy (the prefill queue >= ``high`` while the decode batch is <= ``low``): the decode
instance turns mixed and new prompts go to it too; back to decode once the prefill queue is <= ``low``.
The gap between ``high`` and ``low`` is the hysteresis: a load at one threshold does not flip roles to
and fro every step. With several instances of a role the prefill queue is the longest one's and the decode
batch the largest one's; each instance is judged on its own queue or batch beside those (so the one
instance of a pair is the case above). An instance switches only between its own role and mixed, so at
least one instance always prefills and one always decodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshserve.errors import require


@dataclass(frozen=True)
class RolePolicy:
    high: int
    low: int

    def __post_init__(self) -> None:
        require(
            isinstance(self.low, int) and isinstance(self.high, int) and 0 <= self.low < self.high,
            "pd.switch",
            f"needs integers 0 <= low < high, got high={self.high!r}, low={self.low!r}",
        )

    def decide(
        self,
        roles: dict[str, str],
        stats: dict[str, dict[str, Any]],
        kinds: dict[str, str] | None = None,
    ) -> dict[str, str]:
        """The instances whose role should change now, and to what. ``roles``: each instance's role now;
        ``kinds``: its own role (default: its name, "prefill" or "decode")."""
        kinds = {name: name for name in roles} if kinds is None else kinds
        if set(stats) != set(roles):
            return {}
        queue = max(stats[n]["waiting"] for n in roles if kinds[n] == "prefill")
        batch = max(stats[n]["running"] for n in roles if kinds[n] == "decode")
        out = {}
        for name, role in roles.items():
            if kinds[name] == "prefill":
                own = stats[name]["waiting"]
                if role == "prefill" and batch >= self.high and own <= self.low:
                    out[name] = "mixed"
                elif role == "mixed" and batch <= self.low:
                    out[name] = "prefill"
            else:
                own = stats[name]["running"]
                if role == "decode" and queue >= self.high and own <= self.low:
                    out[name] = "mixed"
                elif role == "mixed" and queue <= self.low:
                    out[name] = "decode"
        return out
