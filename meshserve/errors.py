"""One error type for bad user input, so every door (CLI, HTTP, Python) reports it the same way."""

import math
import numbers


class InputError(ValueError):
    """Bad input: names the offending field and what is allowed.

    The CLI prints it as one line and exits with code 2; the HTTP server answers 400.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self) -> tuple:
        # rebuilt from its two fields, so it crosses a process pool (wafer/fanout.py) intact
        return (type(self), (self.field, self.message))


def require(condition: bool, field: str, message: str) -> None:
    """Raise InputError(field, message) unless condition holds."""
    if not condition:
        raise InputError(field, message)


def integer(value: object, field: str, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high]; bools, floats and strings are refused, not coerced."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise InputError(field, f"must be an integer {bounds}, got {value!r}")
    return int(value)


def number(value: object, field: str, low: float, high: float = math.inf, *, low_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] ((low, high] if low_open); NaN, inf and bools refused."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bounds = (
            f"{'(' if low_open else '['}{low:g}, {high:g}]"
            if high < math.inf
            else (f"{'>' if low_open else '>='} {low:g}")
        )
        raise InputError(field, f"must be a finite number {bounds}, got {value!r}")
    return float(value)


def boolean(value: object, field: str) -> bool:
    """``value`` if it is True or False; "false", 0 and None are refused (they read as something else)."""
    if not isinstance(value, bool):
        raise InputError(field, f"must be true or false, got {value!r}")
    return value


def text(value: str, field: str) -> str:
    """``value`` if it is valid Unicode: a lone surrogate (JSON's "\\ud800") can be neither tokenized nor
    sent back as UTF-8, so every door refuses it with this one error."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(
            field, f"is not valid Unicode text (lone surrogate at character {err.start})"
        ) from None
    return value
