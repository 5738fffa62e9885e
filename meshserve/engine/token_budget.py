"""A per-step token budget that keeps the step time, and so the time between tokens, under a target.

A step's time grows with its tokens: t ~ a + b * tokens (a: the fixed cost of a forward and its Python
around it, b: the cost per token). The engine measures every step and this fits a and b online by
least squares over exponentially decayed sums (recent steps count most, so the fit follows the load
on the machine). The budget is the most tokens whose predicted time stays within the target:
(target - a) / b, floored so that every generating request keeps its token and a prefill still moves
(XY-Serve's token budget: a long prompt is chunked so running decodes are not held back by it), and
at a / b tokens: a target below twice the fixed cost cannot be met by smaller steps, which would only
lose throughput, so a step always does at least as much per-token work as its fixed cost.

Until the steps seen differ enough in size to tell a from b, the budget is the configured maximum.
A fit can hold b too high (one slow step while another process had the cores): the budget then keeps
steps small, and small steps never show the fit wrong. So a step that used its whole budget and still
ended well under the target lets the next budget grow by GROWTH, whatever the fit says: bigger steps
follow, and their times correct the fit.
"""

from __future__ import annotations

DECAY = 0.95  # weight of a step's observation after each later one: about the last 20 steps count
MIN_SPREAD = 4.0  # tokens: the standard deviation of the sizes seen before a slope is trusted
MIN_PREFILL_CHUNK = 16  # tokens a step always leaves a prompt beside the decodes
GROWTH = 1.25  # budget growth after a full step that ended under FAST of the target
FAST = 0.8


class StepTimeModel:
    """seconds ~ a + b * tokens, fitted over decayed sums."""

    def __init__(self, decay: float = DECAY) -> None:
        self.decay = decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1.0
        self._x = d * self._x + tokens
        self._y = d * self._y + seconds
        self._xx = d * self._xx + tokens * tokens
        self._xy = d * self._xy + tokens * seconds

    def fit(self) -> tuple[float, float] | None:
        """(a, b), or None while the sizes seen are too alike (or time does not grow with them)."""
        if self._w == 0.0:
            return None
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var < MIN_SPREAD**2:
            return None
        b = (self._xy / self._w - mx * my) / var
        if b <= 0.0:
            return None
        return max(0.0, my - b * mx), b


class TokenBudget:
    """The token budget of the next step under ``target_ms`` (None: always ``max_tokens``)."""

    def __init__(self, target_ms: float | None, max_tokens: int) -> None:
        self.target_s = None if target_ms is None else target_ms / 1e3
        self.max_tokens = max_tokens
        self.model = StepTimeModel()
        self._last = max_tokens  # the budget handed out last
        self._grow = False

    def observe(self, tokens: int, seconds: float) -> None:
        """A step of ``tokens`` (planned under the last budget handed out) took ``seconds``."""
        if self.target_s is not None and tokens > 0:
            self.model.observe(tokens, seconds)
            self._grow = tokens >= self._last and seconds < FAST * self.target_s

    def tokens(self, num_running: int) -> int:
        """Tokens for the next step with ``num_running`` requests running."""
        fit = None if self.target_s is None else self.model.fit()
        if fit is None:
            self._last = self.max_tokens
            return self._last
        a, b = fit
        fits = int((self.target_s - a) / b + 1e-6)  # (rounding must not lose a whole token)
        if self._grow:
            fits = max(fits, int(self._last * GROWTH) + 1)
        floor = max(num_running + MIN_PREFILL_CHUNK, int(a / b + 1e-6))
        self._last = min(max(fits, floor), self.max_tokens)
        return self._last
