"""When an instance of a prefill/decode pair changes role by itself: thresholds with hysteresis.

Decode-heavy (the decode instance runs >= ``high`` requests while the prefill queue is <= ``low``): the
prefill instance turns mixed and decodes its own requests; it turns back to prefill once the decode batch
is <= ``low``. Prompt-heavy (the prefill queue >= ``high`` while the decode batch is <= ``low``): the decode
instance turns mixed and new prompts go to it too; back to decode once the prefill queue is <= ``low``.
The gap between ``high`` and ``low`` is the hysteresis: a load at one threshold does not flip roles to
and fro every step.
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

    def decide(self, roles: dict[str, str], stats: dict[str, dict[str, Any]]) -> dict[str, str]:
        """The instances whose role should change now, and to what."""
        if set(stats) != {"prefill", "decode"}:
            return {}
        queue, batch = stats["prefill"]["waiting"], stats["decode"]["running"]
        out = {}
        if roles["prefill"] == "prefill" and batch >= self.high and queue <= self.low:
            out["prefill"] = "mixed"
        elif roles["prefill"] == "mixed" and batch <= self.low:
            out["prefill"] = "prefill"
        if roles["decode"] == "decode" and queue >= self.high and batch <= self.low:
            out["decode"] = "mixed"
        elif roles["decode"] == "mixed" and queue <= self.low:
            out["decode"] = "decode"
        return out
