"""Rotary position embedding (RoPE) with the rope_scaling types Llama / Qwen / Mixtral configs use.

Frequencies follow transformers' `modeling_rope_utils` so positions rotate identically on both sides.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from meshserve.errors import InputError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


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


def rope_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_pos: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scale factor for one rope configuration."""
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
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_pos: int) -> None:
        super().__init__()
        inv_freq, self.scale = rope_frequencies(head_dim, theta, scaling, max_pos)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, head_dim] for positions [T], computed directly."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.numel() == 0:
            return self.compute(positions, dtype)
        table = self._tables.get(dtype)
        needed = int(positions.max()) + 1
        if table is None or table[0].shape[0] < needed or table[0].device != positions.device:
            size = max(needed, 2 * (0 if table is None else table[0].shape[0]), 256)
            table = self.compute(torch.arange(size, device=positions.device), dtype)
            self._tables[dtype] = table
        return table[0][positions], table[1][positions]
