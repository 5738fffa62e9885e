"""SamplingParams: how one request samples and when it stops (vLLM's names and meanings).

Every field is checked for type and range on construction, so bad input from any door (Python, CLI,
HTTP) becomes one InputError naming the field and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from meshserve.engine.structured_params import StructuredOutputsParams
from meshserve.errors import InputError, require, text

MAX_LOGPROBS = 20
MAX_N = 64
MAX_PENALTY = 2.0  # presence / frequency: OpenAI's range is [-2, 2]
MAX_LOGIT_BIAS = 100.0  # OpenAI's range is [-100, 100]
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # any 64-bit seed, signed or not (draws.py takes it mod 2**64)
# Below this a temperature is greedy (vLLM's _SAMPLING_EPS): logits / 1e-40 overflow float32 to inf and NaN.
GREEDY_BELOW = 1e-5
MAX_TEMPERATURE = 1e4  # logits / 1e4 are uniform to float32 precision; above ~3e38 the divisor itself is inf
REPETITION_PENALTY_RANGE = (1e-2, 1e2)  # logits of |x| <= ~1e36 stay finite when divided or multiplied
MAX_TOP_K = (1 << 31) - 1  # an int32 index; larger values mean "all" no more than the vocabulary does
MAX_STOP = 16  # stop strings per request (OpenAI allows 4)
MAX_STOP_CHARS = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_CHOICES = 256  # prompts x n: the completions one call may start (an HTTP body, LLM.generate / chat)


@dataclass
class SamplingParams:
    """Per-request sampling settings.

    n: how many completions of the prompt to generate (they share the prompt's KV blocks).
    temperature: 0 (or anything below 1e-5, as in vLLM) means greedy; otherwise logits are divided by it.
    top_p: keep the smallest set of tokens whose probability reaches top_p (1 = all).
    top_k: keep the k most likely tokens (0 or -1 = all).
    min_p: drop tokens less likely than min_p times the most likely one (0 = off).
    presence_penalty / frequency_penalty: subtract from the logit of every token already generated
        once / per occurrence (OpenAI's meaning; in [-2, 2]).
    repetition_penalty: divide positive (multiply negative) logits of tokens seen in prompt or output
        (transformers' meaning; 1 = off).
    logit_bias: token id -> value added to its logit, in [-100, 100].
    max_tokens: most tokens to generate; None = up to the model's max length.
    min_tokens: EOS and stop token ids cannot end the request before this many tokens.
    seed: a seeded request's draws depend only on the seed and the output position (draws.py), so its
        tokens do not depend on the batch, the chunk budget or speculative decoding.
    stop: strings that end generation; the output text is cut before the first one found.
    stop_token_ids: tokens that end generation (kept in token_ids, not shown in text).
    ignore_eos: keep generating after the model's EOS token.
    logprobs: return log-probabilities of the top n tokens (and the sampled one) at every step.
    prompt_logprobs: the same for every prompt token (given the tokens before it; None for the first).
    include_stop_str_in_output: cut the text just after the stop string instead (vLLM's name).
    structured_outputs: the output must match a JSON schema, a regex, a choice or a grammar (grammar.py).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    include_stop_str_in_output: bool = False
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _integer(self.n, "n", 1, MAX_N)
        _number(self.temperature, "temperature", 0.0, MAX_TEMPERATURE, f"(below {GREEDY_BELOW:g} = greedy)")
        _number(self.top_p, "top_p", 0.0, 1.0)
        require(self.top_p > 0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _integer(self.top_k, "top_k", -1, MAX_TOP_K, "(0 or -1 = all)")
        _number(self.min_p, "min_p", 0.0, 1.0)
        _number(self.presence_penalty, "presence_penalty", -MAX_PENALTY, MAX_PENALTY)
        _number(self.frequency_penalty, "frequency_penalty", -MAX_PENALTY, MAX_PENALTY)
        _number(self.repetition_penalty, "repetition_penalty", *REPETITION_PENALTY_RANGE, "(1 = off)")
        self.logit_bias = _logit_bias(self.logit_bias)
        if self.max_tokens is not None:
            _integer(self.max_tokens, "max_tokens", 1, None)
        _integer(self.min_tokens, "min_tokens", 0, self.max_tokens, "(at most max_tokens)")
        if self.seed is not None:
            _integer(self.seed, "seed", *SEED_RANGE, "(must fit in 64 bits)")
        if self.logprobs is not None:
            _integer(self.logprobs, "logprobs", 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _integer(self.prompt_logprobs, "prompt_logprobs", 0, MAX_LOGPROBS)
        self.stop_strings = _stop_strings(self.stop)
        require(
            self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)),
            "stop_token_ids",
            f"must be a list of token ids, got {self.stop_token_ids!r}",
        )
        ids = list(self.stop_token_ids or [])
        require(
            len(ids) <= MAX_STOP_TOKEN_IDS,
            "stop_token_ids",
            f"at most {MAX_STOP_TOKEN_IDS} token ids, got {len(ids)}",
        )
        for i in ids:
            _integer(i, "stop_token_ids", 0, None, "(token ids)")
        self.stop_token_ids = ids
        for name in ("ignore_eos", "include_stop_str_in_output"):
            value = getattr(self, name)
            require(isinstance(value, bool), name, f"must be true or false, got {value!r}")
        require(
            self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
            "structured_outputs",
            "must be a StructuredOutputsParams",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def processes_logits(self) -> bool:
        """Whether logits change before sampling (penalties, bias, min_tokens): such rows get no drafts."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1
            or self.logit_bias
            or self.min_tokens
        )


def _number(value: object, name: str, low: float, high: float, note: str = "") -> None:
    """A finite real number in [low, high] (bools are not numbers here)."""
    span = f"[{low:g}, {high:g}]" if high != math.inf else f">= {low:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(name, f"must be a finite number {span} {note}, got {value!r}".replace("  ", " "))
    require(low <= value <= high, name, f"must be {span} {note}, got {value!r}".replace("  ", " "))


def _integer(value: object, name: str, low: int, high: int | None, note: str = "") -> None:
    """An int (not a bool) in [low, high]; high None = no upper bound."""
    span = f"[{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(name, f"must be an integer {span} {note}, got {value!r}".replace("  ", " "))
    require(
        low <= value and (high is None or value <= high),
        name,
        f"must be {span} {note}, got {value}".replace("  ", " "),
    )


def _stop_strings(stop: object) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    require(
        isinstance(stops, (list, tuple)) and all(isinstance(s, str) and s for s in stops),
        "stop",
        f"must be a non-empty string or a list of them, got {stop!r}"[:200],
    )
    require(len(stops) <= MAX_STOP, "stop", f"at most {MAX_STOP} strings, got {len(stops)}")
    longest = max(len(s) for s in stops) if stops else 0
    require(longest <= MAX_STOP_CHARS, "stop", f"at most {MAX_STOP_CHARS} characters each, got {longest}")
    return [text(s, "stop") for s in stops]


def _logit_bias(bias: object) -> dict[int, float] | None:
    """Token id -> bias; JSON gives the ids as strings, so digit strings are accepted too."""
    if bias is None:
        return None
    require(isinstance(bias, dict), "logit_bias", f"must be a map of token id -> number, got {bias!r}"[:200])
    require(
        len(bias) <= MAX_LOGIT_BIAS_ENTRIES,
        "logit_bias",
        f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(bias)}",
    )
    out: dict[int, float] = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isdigit() else key
        _integer(token, "logit_bias", 0, None, "(keys are token ids)")
        _number(value, "logit_bias", -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS, f"(value for token {token})")
        out[token] = float(value)
    return out or None


def check_choices(prompts: int, completions: int, field: str) -> None:
    """One call's prompts x n (``completions``, summed over the prompts) within MAX_CHOICES."""
    require(
        completions <= MAX_CHOICES,
        field,
        f"{prompts} prompts x n = {completions} completions: at most {MAX_CHOICES} per call "
        "(split the prompts into several calls)",
    )
