"""Multi-head latent attention (DeepSeek-V2/V3): the paged cache holds one compressed latent row per token.

Each token's keys and values come from a latent c (kv_lora_rank wide, normed) and one rope key k_pe
(qk_rope_head_dim) shared by all heads: K_h = [c W_UK_h ; k_pe], V_h = c W_UV_h, with W_UK / W_UV the two
halves of kv_b_proj. The cache stores [c ; k_pe] once per token (one "head", kv_cache_parts=1) instead of
every head's K and V. Attention runs absorbed, as MQA over those rows: W_UK folds into the query
(q_h W_UK_h^T . c = q_h . c W_UK_h), so scores are [q_h W_UK_h^T ; q_pe_h] . [c ; k_pe], and W_UV applies
after attention (softmax(s) V_h = (softmax(s) c) W_UV_h). The cache row doubles as the value row: the op's
output is [softmax(s) c ; softmax(s) k_pe], whose rope columns are dropped (12.5% extra P.V work at the real
512 + 64, against a second copy of every latent).

A step of long prefill chunks runs expanded instead (`expanded_prefill`): each sequence's latent rows are read
back by its block table, kv_b_proj expands them into every head's K (qk_nope + rope wide) and V (v_head_dim),
and ordinary attention runs at those widths, as transformers computes MLA. Expanding costs
kv_lora_rank x (qk_nope + v) per head per context row; absorbing costs the same per query row plus
2 (kv_lora_rank + rope) per score against qk_nope + rope + v_head_dim expanded. Those four terms are weighed
by what each costs on this machine (`FormCosts`: nanoseconds per multiply-add, fitted to timings of both
forms by `benchmarks/mla_attention.py --write-profile`, kept in kernels/profiles/mla.json per ISA, dtype and
row width), and the step takes the form predicted faster. With no profile for the machine each weighs 1: the
multiply-add count alone, by which decodes stay absorbed and a chunk expands when it starts the prompt, or
after a long cached context when it has more than ~160 rows (kv_lora_rank (qk_nope + v) / 832 on
DeepSeek-V3's shapes).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meshserve import switches
from meshserve.errors import InputError
from meshserve.kernels.attention import attend
from meshserve.kernels.attention_tiles import profile_key
from meshserve.kernels.fused import rotary_reference
from meshserve.kernels.meta_attention import write_kv
from meshserve.kernels.smooth_gemm import SmoothLinear
from meshserve.models.batch import BatchMetadata
from meshserve.models.config import ModelConfig, flag, positive
from meshserve.models.layers.attention import StepInputs
from meshserve.models.layers.norm import RMSNorm


@dataclass
class MLAConfig:
    """DeepSeek's attention shape (config.json names) and its softmax scale (YaRN's mscale folded in)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    scale: float

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's 0.1 * mscale * ln(factor) + 1 (1 when not stretched), as DeepSeek and transformers have it."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def read_mla(cfg: ModelConfig, hf: dict[str, Any], interleave_default: bool) -> None:
    """MLA's fields into cfg: the cache holds one latent "head" of kv_lora_rank + qk_rope_head_dim per token,
    which is what the attention plan and the op see (num_kv_heads 1, head_dim that width)."""
    q_lora = hf.get("q_lora_rank")
    q_lora = None if q_lora is None else positive(hf, "q_lora_rank")
    if q_lora is None and flag(hf, "attention_bias", False):
        raise InputError("config.json:attention_bias", "true needs q_lora_rank (q_proj has no bias)")
    mla = MLAConfig(
        q_lora_rank=q_lora,
        kv_lora_rank=positive(hf, "kv_lora_rank"),
        qk_nope_head_dim=positive(hf, "qk_nope_head_dim"),
        qk_rope_head_dim=positive(hf, "qk_rope_head_dim"),
        v_head_dim=positive(hf, "v_head_dim"),
        rope_interleave=flag(hf, "rope_interleave", interleave_default),
        scale=1.0,
    )
    if mla.qk_rope_head_dim % 2:
        raise InputError("config.json:qk_rope_head_dim", f"must be even, got {mla.qk_rope_head_dim}")
    mla.scale = mla.qk_head_dim**-0.5
    scaling = cfg.rope_scaling or {}
    if scaling.get("mscale_all_dim"):  # YaRN stretches the whole q.k, not only its rope part
        try:
            mla.scale *= yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(
                "config.json:rope_scaling", f"mscale_all_dim needs a numeric factor ({err})"
            ) from None
    cfg.mla = mla
    cfg.qkv_bias = cfg.o_bias = flag(hf, "attention_bias", False)
    cfg.num_kv_heads, cfg.head_dim = 1, mla.kv_lora_rank + mla.qk_rope_head_dim
    cfg.rotary_dim, cfg.kv_cache_parts = mla.qk_rope_head_dim, 1


SCORE_ELEMENTS = 1 << 24  # the expanded form's scores per query slice (64 MiB in float32)


class LatentAttention(nn.Module):
    """MLA over the paged latent cache. `qkv_proj` fuses the two projections that read the layer input
    (q_a_proj or q_proj, and kv_a_proj_with_mqa) so one GEMM serves both."""

    def __init__(self, cfg: ModelConfig, window: int | None = None) -> None:
        super().__init__()
        if cfg.mla is None:
            raise ValueError("LatentAttention needs cfg.mla (read_mla)")
        m = self.mla = cfg.mla
        self.window, self.num_heads = window, cfg.num_heads
        q_width = m.q_lora_rank or cfg.num_heads * m.qk_head_dim
        self.split = (q_width, m.kv_lora_rank, m.qk_rope_head_dim)
        self.qkv_proj = SmoothLinear(cfg.hidden_size, sum(self.split), bias=cfg.qkv_bias)
        if m.q_lora_rank is not None:
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = SmoothLinear(m.q_lora_rank, cfg.num_heads * m.qk_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, cfg.rms_norm_eps)
        # Never run as a linear (its halves are absorbed), so a plain Linear: no packed copy of it is kept.
        self.kv_b_proj = nn.Linear(
            m.kv_lora_rank, cfg.num_heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False
        )
        self.o_proj = SmoothLinear(cfg.num_heads * m.v_head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.expand: bool | None = None  # None: each step takes the cheaper form; True / False forces one

    def _rope(self, x: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """Rotary on x [T, heads, rope]. DeepSeek rotates interleaved pairs (x0, x1), (x2, x3)...: listing the
        even dims before the odd ones makes that the rotate-half rotation. q and k are listed alike, so their
        dot products are transformers' exactly."""
        if self.mla.rope_interleave:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        # In cos/sin's dtype: V2 rotates in float32 (transformers' complex product), V3 in the model's.
        return rotary_reference(x.to(step.cos.dtype), step.cos, step.sin).to(x.dtype)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, step: StepInputs) -> torch.Tensor:
        m, t, heads = self.mla, x.shape[0], self.num_heads
        dtype = self.kv_b_proj.weight.dtype  # the model's (x may be float32 for a float32 GEMM)
        q, latent, k_pe = self.qkv_proj(x).to(dtype).split(self.split, dim=-1)
        if m.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q.contiguous()))
        q = q.view(t, heads, m.qk_head_dim)
        q_nope, q_pe = q.split((m.qk_nope_head_dim, m.qk_rope_head_dim), dim=-1)
        key = torch.cat(
            (self.kv_a_layernorm(latent.contiguous()), self._rope(k_pe[:, None, :], step)[:, 0]), -1
        )
        expand = self.expand
        if expand is None:
            costs = form_costs(m.kv_lora_rank + m.qk_rope_head_dim, dtype)
            expand = step.meta is not None and expanded_prefill(step.meta, m, costs)
        if expand and self.window is None:
            o = self._expanded(torch.cat((q_nope, self._rope(q_pe, step)), -1), key, kv_cache, step.meta)
        else:
            o = self._absorbed(q_nope, self._rope(q_pe, step), key, kv_cache, step)
        return self.o_proj(o.reshape(t, heads * m.v_head_dim), out_f32=True)

    def _absorbed(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        key: torch.Tensor,
        kv_cache: torch.Tensor,
        step: StepInputs,
    ) -> torch.Tensor:
        """MQA over the latent rows with W_UK folded into the query and W_UV applied after: [T, H, v]."""
        m, heads = self.mla, self.num_heads
        w = self.kv_b_proj.weight.view(heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        w_uk, w_uv = w.split((m.qk_nope_head_dim, m.v_head_dim), dim=1)  # [H, nope, R], [H, v, R]
        # Absorb W_UK into the query, per head: [H, T, nope] @ [H, nope, R] (the weight read in place).
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
        query = torch.cat((q_latent, q_pe), dim=-1)  # [T, H, R + rope]
        out = attend(query, key[:, None, :], key[:, None, :], kv_cache, step.plans[self.window], m.scale)
        # W_UV after attention: [H, T, R] @ [H, R, v] -> [T, H, v].
        return torch.bmm(out[..., : m.kv_lora_rank].transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    def _expanded(
        self, query: torch.Tensor, key: torch.Tensor, kv_cache: torch.Tensor, meta: BatchMetadata
    ) -> torch.Tensor:
        """Ordinary attention over every sequence's K/V expanded from its latent rows: query [T, H, qk]
        (rope part rotated), key [T, R + rope] this step's latent rows; returns [T, H, v]."""
        m, heads = self.mla, self.num_heads
        write_kv(key[:, None, :], key[:, None, :], kv_cache, meta.slot_mapping)
        block = kv_cache.shape[2]
        lens = meta.seq_lens.long()
        q_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long()
        pos = torch.arange(int(lens.max()), device=lens.device)
        tables = meta.block_tables.long().clamp(min=0)  # padding past a sequence's rows is masked below
        slots = tables[:, pos // block] * block + pos % block  # [S, L]: each context row's cache slot
        rows = kv_cache[0].reshape(-1, key.shape[-1])[slots]  # [S, L, R + rope]
        latent, k_pe = rows.split((m.kv_lora_rank, m.qk_rope_head_dim), dim=-1)
        kv = F.linear(latent, self.kv_b_proj.weight).unflatten(-1, (heads, -1))  # as transformers expands
        k_nope, v = kv.split((m.qk_nope_head_dim, m.v_head_dim), dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(-1, -1, heads, -1)), dim=-1)
        # Queries padded per sequence: flat row r is row j of sequence s, at position lens[s] - q_lens[s] + j.
        seq = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), q_lens)
        j = torch.arange(query.shape[0], device=lens.device) - meta.query_start_loc[:-1].long()[seq]
        q = query.new_zeros(len(lens), int(q_lens.max()), heads, m.qk_head_dim)
        q[seq, j] = query
        q_pos = (lens - q_lens)[:, None] + torch.arange(q.shape[1], device=lens.device)
        mask = pos[None, None, :] <= q_pos[:, :, None]  # [S, Q, L]: causal, and never past the sequence
        # Transformers' eager maths, rounding alike: scores in the model dtype, softmax in float32; in query
        # slices that keep each slice's scores under SCORE_ELEMENTS.
        q, k, v = q.transpose(1, 2), k.permute(0, 2, 3, 1), v.transpose(1, 2)
        step = max(1, SCORE_ELEMENTS // (q.shape[0] * heads * k.shape[-1]))
        out = []
        for q0 in range(0, q.shape[2], step):
            scores = torch.matmul(q[:, :, q0 : q0 + step], k) * m.scale  # [S, H, rows, L]
            scores = scores.masked_fill(~mask[:, None, q0 : q0 + step], float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out.append(torch.matmul(probs, v))  # [S, H, rows, v]
        return torch.cat(out, dim=2).transpose(1, 2)[seq, j]  # [T, H, v]


@dataclass(frozen=True)
class FormCosts:
    """Nanoseconds per multiply-add of each term of the two forms' costs (module docstring): the projections
    (W_UK / W_UV per query row absorbed, kv_b_proj per context row expanded) and the score pairs."""

    absorbed_rows: float = 1.0
    absorbed_pairs: float = 1.0
    expanded_rows: float = 1.0
    expanded_pairs: float = 1.0


SHIPPED_PROFILE = Path(__file__).parents[2] / "kernels" / "profiles" / "mla.json"


def user_profile_path() -> Path:
    """Where `benchmarks/mla_attention.py --write-profile` puts this machine's fit by default."""
    return switches.profile_dir() / "mla.json"


@cache
def form_costs(width: int, dtype: torch.dtype) -> FormCosts:
    """This machine's measured weights for latent rows `width` wide: its own profile, else the shipped entry
    for its ISA, else all 1 (the multiply-add count)."""
    entries = json.loads(SHIPPED_PROFILE.read_text())["entries"]
    user = user_profile_path()
    if user.exists():
        entries = {**entries, **json.loads(user.read_text()).get("entries", {})}
    entry = entries.get(profile_key(width, dtype), {})
    return FormCosts(**{k: float(v) for k, v in entry.items() if k in asdict(FormCosts())})


def form_terms(meta: BatchMetadata, mla: MLAConfig) -> tuple[int, int, int, int]:
    """Multiply-adds per head of each FormCosts term for the step (absorbed rows, absorbed pairs, expanded
    rows, expanded pairs)."""
    lens = meta.seq_lens.long()
    q_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long()
    expand = mla.kv_lora_rank * (mla.qk_nope_head_dim + mla.v_head_dim)
    pairs = int((q_lens * lens).sum())  # query x key pairs, counted alike for both forms
    return (
        meta.num_tokens * expand,
        pairs * 2 * (mla.kv_lora_rank + mla.qk_rope_head_dim),
        int(lens.sum()) * expand,
        pairs * (mla.qk_head_dim + mla.v_head_dim),
    )


def expanded_prefill(meta: BatchMetadata, mla: MLAConfig, costs: FormCosts = FormCosts()) -> bool:
    """Whether the step's expanded form is predicted faster than its absorbed form, by `costs` (default:
    fewer multiply-adds): true for long prefill chunks, false for decodes."""
    a_rows, a_pairs, e_rows, e_pairs = form_terms(meta, mla)
    absorbed = costs.absorbed_rows * a_rows + costs.absorbed_pairs * a_pairs
    return costs.expanded_rows * e_rows + costs.expanded_pairs * e_pairs < absorbed
