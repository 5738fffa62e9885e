"""DeepSeek-V3's multi-token-prediction (MTP) layer, run as a speculative draft (engine/spec/mtp.py).

The layer predicts the token after next: at position i it reads the target's hidden state h_i (the final-
normed row the target's LM head reads) and the embedding of token i + 1, and its logits guess token i + 2:

    x = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)]),  x' = block(x),  logits = lm_head(shared_head.norm(x'))

with `block` an ordinary decoder layer (MLA and the MoE) over its own KV. A chain of drafts feeds x' back in
place of h (as vLLM and SGLang do). The checkpoint stores it as layer num_hidden_layers; its copies of the
embedding and LM head are the main model's (DeepSeek-V3 report, section 2.2), so the main ones are used.
When its MLP is MoE, the tokens it routes are summed over its forwards until `take_counts` reads them: the
expert-load trace records them as a draft layer after the main ones (meshserve/traces.py).
"""

from __future__ import annotations

import torch
from torch import nn

from meshserve.kernels.smooth_gemm import SmoothLinear
from meshserve.models.config import ModelConfig
from meshserve.models.decoder import DecoderLayer
from meshserve.models.layers.attention import StepInputs
from meshserve.models.layers.moe import SparseMoE
from meshserve.models.layers.norm import RMSNorm


class SharedHead(nn.Module):
    """The final norm the MTP layer has of its own (its head is the main LM head)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """A decoder layer with MTP's input projection in front and its own final norm behind."""

    def __init__(self, cfg: ModelConfig, mlp: nn.Module, attention: nn.Module) -> None:
        super().__init__(cfg, mlp, None, attention)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = SmoothLinear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)
        if isinstance(mlp, SparseMoE):
            self.register_buffer("routed", torch.zeros_like(mlp.last_counts), persistent=False)

    def predict(
        self, embeds: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor, step: StepInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x', shared_head.norm(x')) for rows of next-token embeddings and the hidden states before them;
        x' is the next draft's `hidden`, the normed rows go to the LM head."""
        x = self.eh_proj(torch.cat((self.enorm(embeds), self.hnorm(hidden.to(embeds.dtype))), dim=-1))
        x = x.to(embeds.dtype)
        out = self(x, self.input_layernorm(x), kv_cache, step, self.shared_head.norm)
        if isinstance(self.mlp, SparseMoE):
            self.routed += self.mlp.last_counts
        return out

    def take_counts(self) -> torch.Tensor:
        """Tokens its MoE routed to each expert since the last call, [num_experts]; then starts again."""
        counts, self.routed = self.routed, torch.zeros_like(self.routed)
        return counts
