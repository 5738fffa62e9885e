"""The decoder-only transformer every supported architecture shares; arch files choose the MLP per layer.

Parameter names mirror Hugging Face's without the leading "model." (weights.py maps them), with two
fusions: q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, so each needs one GEMM.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from meshserve.kernels.attention import attention_backend, plan_step
from meshserve.kernels.profile import GemmTable, bmm_key, shape_key
from meshserve.kernels.smooth_gemm import GemmChoice, SmoothLinear
from meshserve.models.batch import BatchMetadata
from meshserve.models.config import ModelConfig
from meshserve.models.layers.attention import Attention, StepInputs
from meshserve.models.layers.mlp import GatedMLP
from meshserve.models.layers.moe import SparseMoE, StackedExperts
from meshserve.models.layers.norm import RMSNorm
from meshserve.models.layers.rotary import RotaryEmbedding
from meshserve.models.layers.tied_embedding import TiedEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    Each residual add is fused with the norm that reads its sum: the attention add with this layer's
    post-attention norm, the MLP add with the next layer's input norm (or the final norm), so the forward
    passes (x, norm(x)) from layer to layer. Gemma's sandwich adds a norm on each block's output (its
    post_attention_layernorm; the MLP's input norm is then pre_feedforward_layernorm); Granite scales
    each block's output before the add.
    """

    def __init__(
        self, cfg: ModelConfig, mlp: nn.Module, window: int | None = None, attention: nn.Module | None = None
    ) -> None:
        super().__init__()
        eps, offset = cfg.rms_norm_eps, cfg.norm_offset
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
        self.self_attn = Attention(cfg, window) if attention is None else attention
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
        self.sandwich = cfg.sandwich_norms
        self.residual_scale = cfg.residual_scale
        self.mlp = mlp
        self.dense_mlp = isinstance(mlp, GatedMLP)  # takes and gives float32 around float32 GEMMs

    def forward(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        kv_cache: torch.Tensor,
        step: StepInputs,
        next_norm: RMSNorm,
        next_f32: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream, h = input_layernorm(x); returns (x', next_norm(x')), the latter in
        float32 when next_f32 (its consumer runs a float32 GEMM)."""
        mlp_f32 = self.dense_mlp and self.mlp.gate_up_proj.wants_f32(x.shape[0])
        attn = self._block_out(self.self_attn(h, kv_cache, step), x.dtype, self.post_attention_layernorm)
        mlp_norm = self.pre_feedforward_layernorm if self.sandwich else self.post_attention_layernorm
        x, h = mlp_norm.add_forward(x, attn, mlp_f32)
        out = self.mlp(h, out_f32=True) if self.dense_mlp else self.mlp(h)
        out = self._block_out(out, x.dtype, self.post_feedforward_layernorm if self.sandwich else None)
        return next_norm.add_forward(x, out, next_f32)

    def _block_out(
        self, out: torch.Tensor, dtype: torch.dtype, sandwich_norm: RMSNorm | None
    ) -> torch.Tensor:
        """A block's output as the residual add takes it: Gemma's output norm, Granite's multiplier, each
        on the model-dtype value as transformers computes them (plain blocks pass through unrounded)."""
        if self.sandwich:
            out = sandwich_norm(out.to(dtype))
        if self.residual_scale != 1.0:
            out = out.to(dtype) * self.residual_scale
        return out


class DecoderLM(nn.Module):
    """Causal LM over flat token batches and a paged KV cache (the engine <-> models contract).

    Subclasses (one per Hugging Face architecture) set the class attributes below, read their extra
    config.json fields in `configure`, and pick dense or MoE MLPs in `make_mlp`.
    """

    # (our name fragment, checkpoint name fragment) pairs tried when a tensor is not found as named.
    checkpoint_aliases: tuple[tuple[str, str], ...] = ()
    # config.json field aliases: name -> the name transformers stores (its config's attribute_map).
    config_aliases: ClassVar[dict[str, str]] = {}
    # Per-expert tensor names in classic checkpoints: (gate, up, down).
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # MoE layers a speculative draft built into the model routes through (DeepSeek's MTP), counted after the
    # main ones by expert_counts.
    draft_moe_layers: int = 0
    # Fused tensors of this architecture beyond weights.FUSED: our name -> the checkpoint tensors it stacks.
    fusions: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rotary_dim = cfg.rotary_dim or int(cfg.head_dim * cfg.partial_rotary_factor)
        self.rotary = RotaryEmbedding(
            rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
        )
        self.rotary_local = (
            None
            if cfg.local_rope_theta is None
            else RotaryEmbedding(rotary_dim, cfg.local_rope_theta, None, cfg.max_position_embeddings)
        )
        windows = cfg.layer_windows or [None] * cfg.num_layers
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, self.make_mlp(cfg, i), windows[i], self.make_attention(cfg, windows[i]))
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.lm_head = SmoothLinear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:  # one parameter: named_parameters (and loading) see embed_tokens only
            self.lm_head.weight = self.embed_tokens.weight
            self.lm_head.rows_read = True  # the embedding reads its rows: the layout kept gives them back
        self._moe = [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoE)]

    @classmethod
    def configure(cls, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        """Read the architecture's own config.json fields into cfg (dense defaults: nothing to add)."""

    def make_attention(self, cfg: ModelConfig, window: int | None) -> nn.Module:
        """The attention of one layer; GQA over the paged K/V cache by default."""
        return Attention(cfg, window)

    def make_mlp(self, cfg: ModelConfig, layer: int) -> nn.Module:
        """The MLP of one layer; dense gated (SiLU unless config.json says otherwise) by default."""
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, meta: BatchMetadata, kv_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        """Run T flat tokens; returns final-normed hidden states [T, hidden]. Writes K/V into kv_caches."""
        x = self.embed_tokens(input_ids)
        cfg = self.config
        if cfg.embedding_scale != 1.0:
            x = x * cfg.embedding_scale
        step = self.step_inputs(meta, x.dtype, kv_caches[0])
        t = x.shape[0]
        f32 = [layer.self_attn.qkv_proj.wants_f32(t) for layer in self.layers] + [False]
        h = self.layers[0].input_layernorm(x, f32[0])
        next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x, h = layer(x, h, kv_cache, step, next_norms[i], f32[i + 1])
        return h

    def step_inputs(self, meta: BatchMetadata, dtype: torch.dtype, cache: torch.Tensor) -> StepInputs:
        """Rotary cos/sin and the attention plans one forward's layers share (any layer whose cache is
        shaped like `cache`: the MTP draft's layer too)."""
        cfg = self.config
        cos, sin = self.rotary(meta.positions, dtype, self._context_lens(meta))
        local = None if self.rotary_local is None else self.rotary_local(meta.positions, dtype)
        backend = attention_backend(cache.device, cache.dtype)
        if cfg.attn_logit_softcap and backend == "triton":  # the Triton kernel has no soft-capping
            backend = "reference"
        windows = {layer.self_attn.window for layer in self.layers}
        plans = plan_step(
            meta,
            cache.shape[2],
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cache.dtype,
            windows,
            backend=backend,
        )
        return StepInputs(cos, sin, plans, local, meta)

    def _context_lens(self, meta: BatchMetadata) -> torch.Tensor | None:
        """The sequence length LongRoPE picks each token's frequencies by, as transformers sees it: the
        sequence's whole known length (meta.rope_lens, which the engine sets: a prompt's full length in
        every chunk, the length after a decode or verify). Without it: a whole prompt run from position 0
        at once counts its full length; any other token its own position + 1."""
        if self.rotary.long_from is None:
            return None
        q_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long()
        if meta.rope_lens is not None:
            return torch.repeat_interleave(meta.rope_lens.long(), q_lens, output_size=meta.num_tokens)
        whole = torch.where(meta.seq_lens.long() == q_lens, meta.seq_lens.long(), 0)
        whole = torch.repeat_interleave(whole, q_lens, output_size=meta.num_tokens)
        return torch.maximum(whole, meta.positions + 1)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in float32 for hidden rows [N, hidden] (Granite's scaling and Gemma 2's
        soft-capping on the model-dtype logits, as transformers applies them)."""
        cfg = self.config
        logits = self.lm_head(hidden)
        if cfg.logits_scale != 1.0:
            logits = logits / cfg.logits_scale
        if cfg.final_logit_softcap is not None:
            logits = torch.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        return logits.float()

    def _gemm_choices(
        self, table: GemmTable, max_tokens: int
    ) -> Iterator[tuple[SmoothLinear | StackedExperts, list[list[GemmChoice]]]]:
        """Each linear layer and stacked-expert block with its SmoothGEMM choices for M = 0..max_tokens."""
        for module in self.modules():
            if isinstance(module, SmoothLinear):
                n, k = module.weight.shape
                yield module, [table.by_m(shape_key(n, k), module.weight.dtype, max_tokens)]
            elif isinstance(module, StackedExperts):  # capacity M never exceeds the step's tokens
                weights = (module.gate_up_proj, module.down_proj)
                yield module, [table.by_m(bmm_key(*w.shape), w.dtype, max_tokens) for w in weights]

    def prepare_gemms(self, table: GemmTable, max_tokens: int, budget: int = 0, decode_m: int = 1) -> int:
        """Hand every linear layer its SmoothGEMM choices for M = 0..max_tokens and pack the one layout of
        its weights each keeps (kernels/gemm_layout.py: the one its table picks at M = 1, or voted over
        M = 1..decode_m; extra layouts within ``budget`` bytes, first come first served); returns the bytes
        kept beyond the loaded weights."""
        extra = self._layouts(table, max_tokens, budget, decode_m, prepare=True)
        # the head packed the shared weight (a quantized head's embedding reads its packed rows already)
        if (
            self.config.tie_word_embeddings
            and isinstance(self.lm_head, SmoothLinear)
            and self.lm_head.weight.is_meta
        ):
            self.embed_tokens = TiedEmbedding(self.lm_head)
        return extra

    def kernel_copy_bytes(self, table: GemmTable, max_tokens: int, budget: int = 0, decode_m: int = 1) -> int:
        """Bytes prepare_gemms will keep beyond the loaded weights (net of those it drops); the model may be
        on the meta device."""
        return self._layouts(table, max_tokens, budget, decode_m, prepare=False)

    def _layouts(self, table: GemmTable, max_tokens: int, budget: int, decode_m: int, prepare: bool) -> int:
        extra = 0
        for module, choices in self._gemm_choices(table, max_tokens):
            if isinstance(module, SmoothLinear):
                plan = (module.prepare if prepare else module.plan)(*choices, budget, decode_m=decode_m)
                budget -= plan.budget_used
                extra += plan.extra_bytes
            else:  # the expert blocks keep one copy too, extra ones within the budget (moe.py)
                _, _, kept, used = module.plan(*choices, budget=budget)
                if prepare:
                    module.prepare(*choices, budget=budget)
                budget -= used
                extra += kept
        return extra

    def expert_counts(self) -> torch.Tensor | None:
        """Tokens routed to each expert in the last forward, [num_moe_layers + draft_moe_layers, num_experts]
        (a draft's MoE layers last, as draft_expert_counts takes them); None if dense."""
        if not self._moe:
            return None
        counts = self.main_expert_counts()
        return torch.cat((counts, self.draft_expert_counts())) if self.draft_moe_layers else counts

    def main_expert_counts(self) -> torch.Tensor:
        """Tokens the model's own MoE layers routed to each expert in the last forward, [num_moe_layers,
        num_experts]."""
        return torch.stack([moe.last_counts for moe in self._moe])

    def draft_expert_counts(self) -> torch.Tensor:
        """Tokens the draft's MoE layers routed since the last call, [draft_moe_layers, num_experts]; then
        starts again (a draft runs several forwards per engine step)."""
        return torch.zeros(self.draft_moe_layers, self.config.num_experts, dtype=torch.long)
