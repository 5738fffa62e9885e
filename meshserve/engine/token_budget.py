"""A per-step token budget that keeps the step time, and so the time between tokens, under a target.

A step's time grows with its tokens: t ~ a + b * tokens (a: the fixed cost of a forward and its Python
around it, b: the cost per token). The engine measures every step and this fits a and b online by
least squares over exponentially decayed sums (recent steps count most, so the fit follows the load
on the machine). The budget is the most tokens whose predicted time stays within the target:
(target - a) / b, floored so that every generating request keeps its token and a prefill still moves
(XY-Serve's token budget: a long prompt is chunked so running decodes are not held back by it).

Until the steps seen differ enough in size to tell a from b, the budget is the configured maximum.
"""

from __future__ import annotations

DECAY = 0.95  # weight of a step's observation after each later one: about the last 20 steps count
MIN_SPREAD = 4.0  # tokens: the standard deviation of the sizes seen before a slope is trusted
MIN_PREFILL_CHUNK = 16  # tokens a step always leaves a prompt beside the decodes


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

    def observe(self, tokens: int, seconds: float) -> None:
        if self.target_s is not None and tokens > 0:
            self.model.observe(tokens, seconds)

    def tokens(self, num_running: int) -> int:
        """Tokens for the next step with ``num_running`` requests running."""
        fit = None if self.target_s is None else self.model.fit()
        if fit is None:
            return self.max_tokens
        a, b = fit
        fits = int((self.target_s - a) / b + 1e-6)  # (rounding must not lose a whole token)
        return max(min(fits, self.max_tokens), min(num_running + MIN_PREFILL_CHUNK, self.max_tokens))
