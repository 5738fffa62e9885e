"""Rotary position embedding (RoPE) with the rope_scaling types Llama / Qwen / Mixtral / Phi-3 configs use.

Frequencies follow transformers' `modeling_rope_utils` so positions rotate identically on both sides.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from meshserve.errors import InputError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn(dim: int, base: float, s: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_pos / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.arange(dim // 2, dtype=torch.float32, device="cpu")  # cpu: also under a meta device
    ramp = torch.clamp((ramp - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _longrope(
    dim: int, base: float, s: dict[str, Any], max_pos: int, long: bool
) -> tuple[torch.Tensor, float]:
    """Phi-3's LongRoPE: per-frequency divisors (short_factor within the original context, long_factor
    past it) and sqrt(1 + log(factor) / log(original)) on cos/sin, as transformers computes them."""
    original = s["original_max_position_embeddings"]
    factors = s["long_factor" if long else "short_factor"]
    if not isinstance(factors, list) or len(factors) != dim // 2:
        raise ValueError(f"long_factor / short_factor need {dim // 2} numbers each")
    factor = s.get("factor") or max_pos / original
    scale = s.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32, device="cpu") * base**shape), float(scale)


def rope_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_pos: int, long: bool = False
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scale factor for one rope configuration (`long`:
    LongRoPE's frequencies past the original context)."""
    kind = (scaling or {}).get("rope_type", "default")
    if kind not in ROPE_TYPES:
        allowed = ", ".join(ROPE_TYPES)
        raise InputError("config.json:rope_scaling", f"unsupported rope_type {kind!r}; allowed: {allowed}")
    even = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu")  # cpu: also under a meta device
    inv_freq = 1.0 / (theta ** (even.float() / head_dim))
    try:
        if kind == "linear":
            inv_freq, scale = inv_freq / scaling["factor"], 1.0
        elif kind == "llama3":
            inv_freq, scale = _llama3(inv_freq, scaling), 1.0
        elif kind == "yarn":
            inv_freq, scale = _yarn(head_dim, theta, scaling, max_pos)
        elif kind == "longrope":
            inv_freq, scale = _longrope(head_dim, theta, scaling, max_pos, long)
        else:  # "dynamic" NTK only changes frequencies beyond max_position_embeddings, never reached here
            scale = 1.0
    except KeyError as missing:
        raise InputError("config.json:rope_scaling", f"{kind} scaling needs field {missing}") from None
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise InputError("config.json:rope_scaling", f"{kind} scaling has a bad value ({err})") from None
    if not (bool(torch.isfinite(inv_freq).all()) and math.isfinite(scale) and scale > 0):
        raise InputError(
            "config.json:rope_scaling",
            f"{kind} scaling gives non-finite frequencies; check its numbers ({scaling})",
        )
    return inv_freq, scale


class RotaryEmbedding(nn.Module):
    """cos/sin rows for a batch of positions, shared by all layers of a forward.

    The rows come from a table over positions 0..n-1 (grown by doubling when a step reaches past it), so a
    step gathers rows instead of recomputing cos and sin; the table's values are the same elementwise
    float32 products and roundings a direct computation would give.

    LongRoPE rotates a token with its long frequencies when its sequence (its whole known length: the
    decoder's context_lens) is longer than original_max_position_embeddings, else with the short ones,
    transformers' rule; the engine recomputes a sequence that generation carries past that length.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_pos: int) -> None:
        super().__init__()
        inv_freq, self.scale = rope_frequencies(head_dim, theta, scaling, max_pos)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Float32 CPU copies the tables read (a model-wide .to(bfloat16) would round a buffer).
        self._freqs = inv_freq.clone()
        self.long_from: int | None = None
        if (scaling or {}).get("rope_type") == "longrope":
            self.long_from = scaling["original_max_position_embeddings"]
            self._long_freqs, _ = rope_frequencies(head_dim, theta, scaling, max_pos, long=True)
        self._tables: dict[tuple[torch.dtype, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    def compute(
        self, positions: torch.Tensor, dtype: torch.dtype, long: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, rotary_dim] for positions [T], computed directly (`long`: LongRoPE's long set)."""
        inv_freq = self._long_freqs if long else self._freqs
        freqs = positions[:, None].float() * inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)

    def _table(
        self, positions: torch.Tensor, dtype: torch.dtype, long: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._tables.get((dtype, long))
        needed = int(positions.max()) + 1
        if table is None or table[0].shape[0] < needed or table[0].device != positions.device:
            size = max(needed, 2 * (0 if table is None else table[0].shape[0]), 256)
            table = self.compute(torch.arange(size, device=positions.device), dtype, long)
            self._tables[dtype, long] = table
        return table[0][positions], table[1][positions]

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, context_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for positions [T]; context_lens [T]: each token's sequence length after this step
        (LongRoPE only; default position + 1)."""
        if positions.numel() == 0:
            return self.compute(positions, dtype)
        if self.long_from is None:
            return self._table(positions, dtype, False)
        lens = positions + 1 if context_lens is None else context_lens
        long = (lens > self.long_from)[:, None]
        short_rows, long_rows = self._table(positions, dtype, False), self._table(positions, dtype, True)
        return torch.where(long, long_rows[0], short_rows[0]), torch.where(long, long_rows[1], short_rows[1])
