"""MoE model shapes (from the models' public Hugging Face configs) as presets, plus per-token costs."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.errors import InputError
from meshserve.wafer.presets import Section, preset_names, read_preset


@dataclass(frozen=True)
class Attention:
    """Attention shape. kind "mla" (DeepSeek latent attention) or "gqa" (grouped-query)."""

    kind: str
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # gqa
    q_lora_rank: int = 0  # mla; 0: no query latent, a plain q_proj (DeepSeek's q_lora_rank null)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0


@dataclass(frozen=True)
class MoEModel:
    """The numbers of an MoE transformer that decide decode compute and communication."""

    name: str
    hidden_size: int
    num_layers: int
    first_dense_layers: int
    dense_intermediate_size: int
    routed_experts: int
    shared_experts: int
    top_k: int
    moe_intermediate_size: int
    bytes_per_element: int
    attention: Attention

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's hidden state on the wire (dispatch, combine, all-reduce)."""
        return self.hidden_size * self.bytes_per_element

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def attention_params(self) -> int:
        """Weights of one attention block (projections only)."""
        a, h = self.attention, self.hidden_size
        if a.kind == "gqa":
            return h * a.head_dim * (2 * a.num_heads + 2 * a.num_kv_heads)
        qk = a.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)
        q = h * a.q_lora_rank + a.q_lora_rank * qk if a.q_lora_rank else h * qk
        kv = h * (a.kv_lora_rank + a.qk_rope_head_dim)
        kv += a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
        return q + kv + a.num_heads * a.v_head_dim * h

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one context token occupies in one layer."""
        a = self.attention
        if a.kind == "gqa":
            return 2 * a.num_kv_heads * a.head_dim * self.bytes_per_element
        return (a.kv_lora_rank + a.qk_rope_head_dim) * self.bytes_per_element

    def kv_shards(self, tp: int) -> int:
        """How many ways a TP group splits a sequence's KV cache: GQA splits its KV heads over TP
        (replicated when TP exceeds them); MLA's latent has no heads to split, so every member
        holds all of it."""
        return min(tp, self.attention.num_kv_heads) if self.attention.kind == "gqa" else 1

    @property
    def attention_flops_per_context_token(self) -> int:
        """FLOPs one query token spends per context token (scores + weighted sum), all heads."""
        a = self.attention
        if a.kind == "gqa":
            return 4 * a.num_heads * a.head_dim
        # absorbed MLA decode: scores over (latent + rope), values over the latent
        return 2 * a.num_heads * (2 * a.kv_lora_rank + a.qk_rope_head_dim)


def model_names() -> list[str]:
    """Names of the bundled model presets."""
    return preset_names("models")


def load_model(name: str) -> MoEModel:
    """Load and validate a model preset by name (see model_names()) or YAML path."""
    data = read_preset("models", name, "model")
    name = str(data.get("name", name))
    top = Section(data, name)
    a = top.section("attention")
    kind = a.choice("kind", ("mla", "gqa"))
    ints = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    attention = Attention(
        kind=kind,
        num_heads=a.integer("num_heads"),
        num_kv_heads=a.integer("num_kv_heads"),
        **(
            {"head_dim": a.integer("head_dim")}
            if kind == "gqa"
            else {k: a.integer(k, minimum=0 if k == "q_lora_rank" else 1) for k in ints}
        ),
    )
    model = MoEModel(
        name=name,
        hidden_size=top.integer("hidden_size"),
        num_layers=top.integer("num_layers"),
        first_dense_layers=top.integer("first_dense_layers", minimum=0),
        dense_intermediate_size=top.integer("dense_intermediate_size"),
        routed_experts=top.integer("routed_experts"),
        shared_experts=top.integer("shared_experts", minimum=0),
        top_k=top.integer("top_k"),
        moe_intermediate_size=top.integer("moe_intermediate_size"),
        bytes_per_element=top.integer("bytes_per_element"),
        attention=attention,
    )
    top.reject_unknown()
    if model.top_k > model.routed_experts:
        raise InputError(f"{name}.top_k", f"must be <= routed_experts ({model.routed_experts})")
    if model.first_dense_layers >= model.num_layers:
        raise InputError(f"{name}.first_dense_layers", f"must be < num_layers ({model.num_layers})")
    return model
