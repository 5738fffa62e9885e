"""The draft model's lean forward: its own contiguous KV per request slot, a few torch ops per layer.

A draft forward is tiny (the shipped draft: hidden 96, 2 layers), so what it costs is fixed overhead per
forward, not FLOPs. The engine's paged path pays for block tables, slot mappings, an attention tile plan
and SmoothGEMM dispatch on every call; here a request owns one slot of a preallocated
[slots, 2 * kv_heads, max_len + 1, head_dim] cache per layer, a step writes its K/V at the rows' positions
and attention reads rows 0..len of the slots with SDPA. Rolling back a rejected draft is just feeding the
next tokens at a lower position (their rows are overwritten). Fewer ops per layer: the weights are taken
out of the modules once (no nn.Module attribute lookups per call), the RMSNorm scales are folded into the
linear layer that reads the norm, and rotary is one batched matmul of q and k by each row's rotation
matrix (built once per forward, shared by the layers) instead of split / negate / concatenate / add.

Requests in one forward may feed different numbers of tokens (a catch-up of 1..k+1 verified tokens, or a
whole prompt): they are padded to the longest. A padded row writes its K/V to the scratch row ``max_len``
(never read) and repeats its request's last real position, so it never sees an all-masked row.

Tokens need not match the paged path bit for bit: the draft only proposes and the target verifies.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.models.config import ModelConfig
from meshserve.models.decoder import DecoderLM
from meshserve.models.layers.attention import Attention
from meshserve.models.layers.mlp import GatedMLP


class _Layer(NamedTuple):
    """One decoder layer's tensors, norm scales folded into the weights that read the normed rows."""

    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor | None  # dense MLP; None: the model's own MoE block (norm scale unfolded)
    down: torch.Tensor | None
    attn: Attention
    mlp: nn.Module
    mlp_norm: torch.Tensor


# ModelConfig options the lean forward below leaves out, each with the value that means "off".
UNSUPPORTED = {
    "norm_offset": 0.0,
    "sandwich_norms": False,
    "hidden_act": "silu",
    "partial_rotary_factor": 1.0,
    "qk_norm_per_head": True,
    "clip_qkv": None,
    "attn_logit_softcap": None,
    "final_logit_softcap": None,
    "embedding_scale": 1.0,
    "residual_scale": 1.0,
    "logits_scale": 1.0,
    "local_rope_theta": None,
    "quantization": None,  # the runner folds norms into dense weights
}


def unsupported_options(cfg: ModelConfig) -> list[str]:
    """The options of `cfg` this runner cannot run (a Gemma, Phi-4-mini, OLMoE or Granite draft)."""
    return [name for name, off in UNSUPPORTED.items() if getattr(cfg, name) != off]


def _fold(weight: torch.Tensor, norm_scale: torch.Tensor) -> torch.Tensor:
    """W diag(g sqrt(H)): linear(x / |x|, W diag(g sqrt(H))) == linear(rmsnorm(x) with scale g, W)."""
    scale = norm_scale.float() * norm_scale.shape[0] ** 0.5
    return (weight.float() * scale[None, :]).to(weight.dtype)


class DraftRunner:
    """Runs a DecoderLM on batches of (slot, start, tokens) against per-slot contiguous KV."""

    def __init__(self, model: DecoderLM, max_len: int, slots: int = 4, max_slots: int | None = None) -> None:
        cfg = model.config
        self.model = model
        self.max_len = max_len
        self.max_slots = max_slots  # the cache never grows past this many slots (None: no bound)
        slots = slots if max_slots is None else min(slots, max_slots)
        self.dtype = model.embed_tokens.weight.dtype
        self.kv = [self._cache(slots) for _ in range(cfg.num_layers)]
        self.free_slots = list(range(slots - 1, -1, -1))
        self.layers = [self._layer(layer) for layer in model.layers]
        self.lm_head = _fold(model.lm_head.weight.detach(), model.norm.weight.detach())
        self.embed = model.embed_tokens.weight.detach()
        # rotate_half as a matrix: x @ swap == cat(-x[half:], x[:half]), so a row's rotation is
        # diag(cos) + swap * sin (columns scaled by sin).
        half = cfg.head_dim // 2
        swap = torch.zeros(cfg.head_dim, cfg.head_dim)
        swap[torch.arange(half) + half, torch.arange(half)] = -1.0
        swap[torch.arange(half), torch.arange(half) + half] = 1.0
        self.swap = swap.to(self.dtype)

    @staticmethod
    def _layer(layer: nn.Module) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        g_in, g_mlp = layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()
        dense = isinstance(mlp, GatedMLP)
        return _Layer(
            qkv=_fold(attn.qkv_proj.weight.detach(), g_in),
            qkv_bias=attn.qkv_proj.bias,
            o=attn.o_proj.weight.detach(),
            o_bias=attn.o_proj.bias,
            gate_up=_fold(mlp.gate_up_proj.weight.detach(), g_mlp) if dense else None,
            down=mlp.down_proj.weight.detach() if dense else None,
            attn=attn,
            mlp=mlp,
            mlp_norm=g_mlp.float() * g_mlp.shape[0] ** 0.5,
        )

    def _cache(self, slots: int) -> torch.Tensor:
        cfg = self.model.config
        return torch.zeros(slots, 2 * cfg.num_kv_heads, self.max_len + 1, cfg.head_dim, dtype=self.dtype)

    @staticmethod
    def slot_bytes(model: DecoderLM, max_len: int) -> int:
        """Bytes of one slot's K and V over all of the draft's layers (its scratch row included)."""
        cfg = model.config
        per_layer = 2 * cfg.num_kv_heads * (max_len + 1) * cfg.head_dim * model.embed_tokens.weight.itemsize
        return cfg.num_layers * per_layer

    @property
    def num_slots(self) -> int:
        return self.kv[0].shape[0]

    def acquire(self) -> int:
        """A free slot; the cache doubles when none is left, up to ``max_slots`` (slots never outnumber the
        requests that may draft, which the engine's KV budget counts)."""
        if not self.free_slots:
            old = self.num_slots
            new = 2 * old if self.max_slots is None else min(2 * old, self.max_slots)
            if new == old:
                raise RuntimeError(f"all {old} draft KV slots are taken (max_slots): a slot was not released")
            self.kv = [torch.cat((cache, self._cache(new - old))) for cache in self.kv]
            self.free_slots = list(range(new - 1, old - 1, -1))
        return self.free_slots.pop()

    def release(self, slot: int) -> None:
        self.free_slots.append(slot)

    @torch.inference_mode()
    def forward(
        self, slots: torch.Tensor, starts: torch.Tensor, ids: torch.Tensor, lens: torch.Tensor
    ) -> torch.Tensor:
        """Float32 logits [R, vocab] at each request's last fed token.

        slots, starts, lens: int64 [R]; request r feeds ``ids[r, :lens[r]]`` (int64 [R, W], padded) at
        positions ``starts[r] ..``, and its slot then holds KV for positions 0 .. starts[r] + lens[r] - 1.
        """
        cfg = self.model.config
        rows, width = ids.shape
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if width == 1:  # the decode steps: one token per request, no padding
            pos, write, slot_of_row = starts, starts, slots
            kv_len = int(starts.max()) + 1
        else:
            step = torch.arange(width)
            real = step < lens[:, None]
            pos = starts[:, None] + torch.minimum(step, lens[:, None] - 1)  # padded rows repeat the last one
            write = torch.where(real, starts[:, None] + step, self.max_len).flatten()  # ... and write scratch
            slot_of_row = slots.repeat_interleave(width)
            kv_len = int((starts + lens).max())
        cos, sin = self.model.rotary(pos.flatten(), self.dtype)
        rotation = torch.diag_embed(cos) + self.swap * sin[:, None, :]  # [T, D, D]
        masks = {w: self._mask(pos, rows, width, kv_len, w) for w in {lay.attn.window for lay in self.layers}}
        one = int(slots[0]) if rows == 1 else None  # one request reads its KV as a view, not a gather

        x = F.embedding(ids.flatten(), self.embed)  # [R * W, hidden]
        for lay, cache in zip(self.layers, self.kv, strict=True):
            attn = lay.attn
            h = self._unit_rms(x)
            qkv = F.linear(h, lay.qkv, lay.qkv_bias).view(-1, heads + 2 * kv_heads, head_dim)
            if attn.q_norm is not None:  # Qwen3: per-head norm before rotary
                qkv = torch.cat(
                    (
                        attn.q_norm(qkv[:, :heads]),
                        attn.k_norm(qkv[:, heads : heads + kv_heads]),
                        qkv[:, heads + kv_heads :],
                    ),
                    dim=1,
                )
            qk = torch.matmul(qkv[:, : heads + kv_heads], rotation)
            cache[slot_of_row, :, write] = torch.cat((qk[:, heads:], qkv[:, heads + kv_heads :]), dim=1)
            kv = cache[one : one + 1, :, :kv_len] if one is not None else cache[slots, :, :kv_len]
            q = qk[:, :heads].view(rows, width, heads, head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q,
                kv[:, :kv_heads],
                kv[:, kv_heads:],
                masks[attn.window],
                scale=attn.scale,
                enable_gqa=kv_heads != heads,
            )
            x = x + F.linear(out.transpose(1, 2).reshape(rows * width, -1), lay.o, lay.o_bias)
            h = self._unit_rms(x)
            if lay.gate_up is not None:
                gate, up = F.linear(h, lay.gate_up).chunk(2, dim=-1)
                x = x + F.linear(F.silu(gate) * up, lay.down)
            else:  # MoE (a layer-skip draft of an MoE target): the model's own block
                x = x + lay.mlp((h * lay.mlp_norm).to(x.dtype)).to(x.dtype)  # mlp_norm: g sqrt(H)
        last = x if width == 1 else x[torch.arange(rows) * width + lens - 1]
        return F.linear(self._unit_rms(last), self.lm_head).float()

    def _unit_rms(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) up to the factor sqrt(hidden) folded into the weights: x / |x| in three ops (the norm's
        eps only matters for rows near zero, and drafts need not be exact)."""
        return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + 1e-12)

    @staticmethod
    def _mask(
        pos: torch.Tensor, rows: int, width: int, kv_len: int, window: int | None
    ) -> torch.Tensor | None:
        """Attention mask [R, 1, W, kv_len]: key j is seen from position p when j <= p (and p - j < window).
        None for one request feeding one token, which sees all its keys."""
        if rows == 1 and width == 1 and (window is None or kv_len <= window):
            return None
        keys = torch.arange(kv_len)
        pos = pos.view(rows, width)
        ok = keys <= pos[..., None]
        if window is not None:
            ok &= keys > pos[..., None] - window
        return ok[:, None]
