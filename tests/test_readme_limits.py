"""README "Limits and errors" states every bound the doors enforce with the value the code has: each
numeric constant of the door modules is given a row (or the section), and its value, spelled as the README
spells numbers, must appear there. A new bound without a README entry, or a changed value, fails here."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import meshserve.cli as cli
import meshserve.config as config
import meshserve.engine.sampling_params as sampling_params
import meshserve.models.tokenizer as tokenizer
import meshserve.server.app as app
import meshserve.server.responses as responses
import meshserve.server.serve as serve

README = Path(__file__).parents[1] / "README.md"
MODULES = (sampling_params, app, serve, responses, tokenizer, config)
NOT_BOUNDS = {"DEFAULT_MAX_NUM_SEQS", "BLOCK_SIZES"}  # a default; the allowed values, listed by the error
SECTION = None  # the whole section (the engine-arguments list), not a table row
ROW = {  # constant -> the README table row ("what" column) that states it
    "MAX_N": "`n`",
    "MAX_CHOICES": "`n`",
    "MAX_TEMPERATURE": "`temperature`",
    "GREEDY_BELOW": "`temperature`",
    "MAX_TOP_K": "`top_p`, `top_k`, `min_p`",
    "MAX_PENALTY": "`presence_penalty`, `frequency_penalty`",
    "REPETITION_PENALTY_RANGE": "`repetition_penalty`",
    "MAX_LOGIT_BIAS": "`logit_bias`",
    "MAX_LOGIT_BIAS_ENTRIES": "`logit_bias`",
    "MAX_STOP": "`stop`, `stop_token_ids`",
    "MAX_STOP_CHARS": "`stop`, `stop_token_ids`",
    "MAX_STOP_TOKEN_IDS": "`stop`, `stop_token_ids`",
    "MAX_LOGPROBS": "`logprobs`, `prompt_logprobs`",
    "MIN_LOGPROB": "`logprobs`, `prompt_logprobs`",
    "SEED_RANGE": "`seed`, `max_tokens`, `min_tokens`",
    "MAX_CHARS_SLACK": "prompt",
    "MAX_BODY_BYTES": "HTTP body",
    "BODY_TIMEOUT_S": "HTTP body",
    "MAX_CONNECTIONS": "connections",
    "KEEP_ALIVE_S": "connections",
    "HEADER_TIMEOUT_S": "connections",
    "MAX_HEADER_BYTES": "connections",
    "RETRY_AFTER_S": "waiting requests",
    "MAX_GRACE_S": "SIGTERM",
    "CUT_MARGIN_S": "SIGTERM",
    "MAX_TOKENS": SECTION,
    "MAX_TPOT_MS": SECTION,
}


def spellings(value: int | float) -> set[str]:
    """How the README may write ``value``: 1024, 1,024, 2^31-1, 2^24, 4 MiB, 64 KiB, 10^4, 10^-5, 0.01."""
    out = {str(value)}  # 0.01, -9999.0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    out |= {str(value), f"{value:,}" if isinstance(value, int) else f"{value:g}"}
    if isinstance(value, int) and value > 0:
        bits = value.bit_length()
        if value == (1 << bits) - 1:
            out.add(f"2^{bits}-1")
        if value == 1 << (bits - 1):
            out.add(f"2^{bits - 1}")
            out |= {f"{value >> 20} MiB"} if value % (1 << 20) == 0 else set()
            out |= {f"{value >> 10} KiB"} if value % (1 << 10) == 0 else set()
    if value > 0 and math.log10(value).is_integer():
        out.add(f"10^{int(math.log10(value))}")
    return out


def bounds() -> dict[str, tuple[int | float, ...]]:
    """Every numeric module constant of the door modules (a range gives both ends)."""
    found: dict[str, tuple[int | float, ...]] = {}
    for module in MODULES:
        for name, value in vars(module).items():
            values = value if isinstance(value, tuple) else (value,)
            numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
            if re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and numeric and name not in NOT_BOUNDS:
                found[name] = values
    return found


def limits_section() -> tuple[str, dict[str, str]]:
    text = README.read_text()
    section = text[text.index("## Limits and errors") :]
    section = section[: section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| what"):
            what, bound = line[2:].split(" | ", 1)
            rows[what] = bound
    return section, rows


def appears(value: int | float, text: str) -> bool:
    # a whole number: not the 2 of 1,024 or of 2^24, not 1 of 10^4
    edge = r"(?<![\w.^,])({})(?![\w^]|[.,]\d)"
    if value < 0:  # a negative value is written with its sign
        return any(re.search(edge.format(re.escape("-" + s)), text) for s in spellings(-value))
    return any(re.search(edge.format(re.escape(s)), text) for s in spellings(value))


def test_every_bound_in_the_code_is_in_the_readme_with_its_value():
    section, rows = limits_section()
    found = bounds()
    assert set(found) == set(ROW), "a bound without a README entry (add it to README and ROW), or one gone"
    for name, values in found.items():
        where = section if ROW[name] is SECTION else rows[ROW[name]]
        if name == "SEED_RANGE":  # any 64-bit seed, signed or not
            assert f"{values[1].bit_length()} bits" in where
            continue
        for value in values:
            assert appears(value, where), f"{name} = {value}: not in README's {ROW[name]!r} entry"


def test_the_serve_flags_default_to_the_bounds_the_readme_states():
    flags = inspect.signature(cli.serve).parameters
    assert flags["max_connections"].default.default == serve.MAX_CONNECTIONS
    assert flags["graceful_shutdown_s"].default.default <= serve.MAX_GRACE_S
    _, rows = limits_section()
    assert appears(flags["max_waiting_requests"].default.default, rows["waiting requests"])
    assert appears(flags["graceful_shutdown_s"].default.default, rows["SIGTERM"])


def test_spellings_and_whole_number_matching():
    assert {"1024", "1,024", "2^10", "1 KiB"} <= spellings(1024)
    assert "4 MiB" in spellings(4 << 20) and "2^31-1" in spellings((1 << 31) - 1)
    assert "10^-5" in spellings(1e-5) and "10^4" in spellings(1e4) and "0.01" in spellings(1e-2)
    assert appears(2, "[-2, 2]") and not appears(2, "2^24 and 1,024")
    assert appears(-9999.0, "reported as -9999.0") and not appears(-9999.0, "reported as 9999")
