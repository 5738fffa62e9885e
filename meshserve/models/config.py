"""ModelConfig: the few numbers the engine and the layers need, parsed from a Hugging Face config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from meshserve.errors import InputError

if TYPE_CHECKING:  # DeepSeek's layers own their settings
    from meshserve.models.layers.grouped_moe import GroupedRouting
    from meshserve.models.layers.mla import MLAConfig
    from meshserve.models.quant.config import QuantConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"  # the checkpoint's own dtype (config.json's torch_dtype, or dtype in transformers 5)


def parse_dtype(dtype: str | torch.dtype, hf: dict[str, Any] | None = None) -> torch.dtype:
    """Map "float32" / "bfloat16" / "float16" (or the torch dtypes themselves) to a torch dtype; "auto" takes
    config.json's (``hf``) torch_dtype / dtype, float32 when it names none (as transformers does)."""
    if dtype == AUTO:
        hf = hf or {}
        key = "dtype" if hf.get("dtype") is not None else "torch_dtype"
        saved = hf.get(key) or "float32"
        if not isinstance(saved, str) or saved.removeprefix("torch.") not in DTYPES:
            raise InputError(f"config.json:{key}", f"unsupported {saved!r}; allowed: {', '.join(DTYPES)}")
        return DTYPES[saved.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InputError("dtype", f"unsupported dtype {dtype!r}; allowed: {AUTO}, {', '.join(DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16: the name parse_dtype reads back."""
    return str(dtype).removeprefix("torch.")


@dataclass
class ModelConfig:
    """Model shape and options. The first block is the engine's contract; the rest feeds the layers."""

    name: str
    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    dtype: torch.dtype
    num_experts: int = 0
    top_k: int = 0
    num_moe_layers: int = 0

    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    qk_norm_per_head: bool = True  # False: one norm over all heads' q (and k) at once (OLMoE)
    moe_layers: list[int] = field(default_factory=list)
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    # Sampling defaults from generation_config.json (SamplingParams names), used when a request omits them.
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # PoolingParams fields a sentence-transformers checkpoint declares (pooling_config.py); {} for none
    pooling_defaults: dict[str, Any] = field(default_factory=dict)
    layer_windows: list[int | None] = field(default_factory=list)  # sliding window per layer; None: full
    # Family options (the defaults are Llama's): see the arch file that sets each.
    hidden_act: str = "silu"
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma stores weight - 1
    partial_rotary_factor: float = 1.0  # rotary on the first fraction of each head (Phi-4-mini)
    attention_scale: float | None = None  # None: head_dim ** -0.5
    attn_logit_softcap: float | None = None  # cap * tanh(score / cap) before the softmax (Gemma 2)
    final_logit_softcap: float | None = None  # the same on the logits (Gemma 2)
    clip_qkv: float | None = None  # q, k and v clamped to [-clip, clip] (OLMoE)
    embedding_scale: float = 1.0  # embeddings times this (Gemma: sqrt(hidden); Granite: its multiplier)
    residual_scale: float = 1.0  # each block's output times this before the residual add (Granite)
    logits_scale: float = 1.0  # logits divided by this (Granite's logits_scaling)
    sandwich_norms: bool = False  # Gemma: norms after attention and MLP outputs too, and before the MLP
    # Sliding layers' own rope (Gemma 3: rope_local_base_freq, no scaling); None: every layer shares one.
    local_rope_theta: float | None = None
    rotary_dim: int = 0  # dims rotary turns (0: head_dim); MLA turns only each head's rope part
    kv_cache_parts: int = 2  # 2: K and V; 1: keys that are also the values (MLA's latent, head_dim wide)
    mla: MLAConfig | None = None  # DeepSeek's multi-head latent attention
    routing: GroupedRouting | None = None  # DeepSeek's grouped top-k router
    num_mtp_layers: int = 0  # DeepSeek-V3's multi-token-prediction layers in the checkpoint
    use_mtp: bool = False  # build (and load) the first of them: speculation's draft (method "mtp")
    mtp_moe: bool = False  # that layer's MLP is MoE (it follows the checkpoint's dense / MoE layer rule)
    quantization: QuantConfig | None = None  # weight-only int8 / int4 layers (models/quant/)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def headless(self) -> bool:
        """An ``...Model`` checkpoint (e.g. LlamaModel): no LM head and no ``model.`` prefix; embeddings
        only (its lm_head is tied to the input embedding so the forward has one)."""
        return self.arch.endswith("Model")


# generation_config.json name -> SamplingParams name, for the defaults a request inherits (as vLLM does).
GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def resolve_aliases(hf: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    """config.json with each field readable under every name transformers accepts for it.

    ``aliases`` maps a name to the one transformers stores (its config class's ``attribute_map``): e.g.
    transformers 5 saves Qwen3-MoE's expert count as ``num_local_experts``, older versions ``num_experts``.
    """
    hf = dict(hf)
    for alias, name in aliases.items():
        if alias in hf and name in hf and hf[alias] != hf[name]:
            raise InputError(f"config.json:{alias}", f"{hf[alias]!r} disagrees with {name}={hf[name]!r}")
        value = hf.get(name, hf.get(alias))
        if value is not None:
            hf[alias] = hf[name] = value
    return hf


def generation_defaults(generation: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields generation_config.json sets (greedy when it says do_sample: false), each
    checked as SamplingParams checks a request's: a bad one is the model's fault, refused at load."""
    from meshserve.engine.sampling_params import SamplingParams  # the engine package imports this module

    defaults = {}
    for theirs, ours in GENERATION_DEFAULTS.items():
        value = generation.get(theirs)
        if value is None:
            continue
        try:
            SamplingParams(**{ours: value})
        except InputError as err:
            raise InputError(f"generation_config.json:{theirs}", err.message) from None
        defaults[ours] = value
    if generation.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


def _get(hf: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    """Read one config.json field, checking its type; a missing field without default is an error."""
    value = hf.get(key, default)
    if value is None and default is None:
        raise InputError(f"config.json:{key}", "missing required field")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InputError(f"config.json:{key}", f"expected {kind.__name__}, got {value!r}")
    return value


def positive(hf: dict[str, Any], key: str, default: int | None = None) -> int:
    value = _get(hf, key, int, default)
    if value <= 0:
        raise InputError(f"config.json:{key}", f"must be a positive integer, got {value}")
    return value


def positive_real(hf: dict[str, Any], key: str, default: float, where: str = "config.json") -> float:
    """A finite float > 0 (rope_theta, rms_norm_eps): 0, negatives, NaN and inf make garbage, not text."""
    value = hf.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise InputError(f"{where}:{key}", f"must be a finite number > 0, got {value!r}")
    return float(value)


def flag(hf: dict[str, Any], key: str, default: bool) -> bool:
    """A true/false field; the string "false" would read as True, so anything but a JSON bool is refused."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InputError(f"config.json:{key}", f"must be true or false, got {value!r}")
    return value


ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


def activation(hf: dict[str, Any], key: str) -> str:
    """The MLP's activation: SiLU (Llama and most) or the tanh-approximated GELU (Gemma)."""
    act = hf.get(key) or "silu"
    if act not in ACTIVATIONS:
        raise InputError(
            f"config.json:{key}", f"unsupported activation {act!r}; allowed: {', '.join(ACTIVATIONS)}"
        )
    return act


def optional_real(hf: dict[str, Any], key: str) -> float | None:
    """A finite float > 0, or None when the field is absent or null (an option that is off)."""
    return None if hf.get(key) is None else positive_real(hf, key, 1.0)


def rope(hf: dict[str, Any], layer_type: str = "full_attention") -> tuple[float, dict[str, Any] | None]:
    """rope_theta and rope_scaling from either the classic fields or transformers v5 `rope_parameters`
    (which Gemma 3 nests per layer type: `layer_type` picks one)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    if isinstance(params, dict):
        theta = positive_real(
            params, "rope_theta", positive_real(hf, "rope_theta", 10000.0), "config.json:rope_parameters"
        )
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    else:
        theta = positive_real(hf, "rope_theta", 10000.0)
        scaling = hf.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise InputError("config.json:rope_scaling", f"expected an object or null, got {scaling!r}")
    if scaling:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    return theta, scaling or None


def _partial_rotary(hf: dict[str, Any]) -> float:
    """The rotated fraction of each head: top level (classic) or in rope_parameters (transformers v5)."""
    params = hf.get("rope_parameters")
    inner = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    value = hf.get("partial_rotary_factor", inner)
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise InputError("config.json:partial_rotary_factor", f"must be in (0, 1], got {value!r}")
    return float(value)


def _token_ids(value: Any, field: str, vocab_size: int) -> list[int]:
    """eos/bos ids: an int or a list of ints, each a real token (an id past the vocabulary never stops)."""
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise InputError(
            field, f"expected token ids in [0, {vocab_size - 1}] (an int or a list), got {value!r}"
        )
    return list(ids)


def parse_config(
    hf: dict[str, Any], arch: str, name: str, dtype: torch.dtype, generation: dict[str, Any] | None = None
) -> ModelConfig:
    """Build a ModelConfig from config.json (and generation_config.json, whose token ids win)."""
    generation = generation or {}
    hidden = positive(hf, "hidden_size")
    heads = positive(hf, "num_attention_heads")
    kv_heads = positive(hf, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise InputError("config.json:num_key_value_heads", f"must divide num_attention_heads={heads}")
    head_dim = positive(hf, "head_dim") if hf.get("head_dim") is not None else hidden // heads
    if head_dim <= 0:
        raise InputError("config.json:num_attention_heads", f"must be <= hidden_size ({hidden}), got {heads}")
    num_layers = positive(hf, "num_hidden_layers")
    theta, scaling = rope(hf)
    act = activation(hf, "hidden_act")
    max_pos = positive(hf, "max_position_embeddings", 2048)
    vocab = positive(hf, "vocab_size")

    def special(key: str) -> list[int]:  # both files checked; generation_config.json wins, as in transformers
        given = [
            _token_ids(f.get(key), f"{name}:{key}", vocab)
            for f, name in ((generation, "generation_config.json"), (hf, "config.json"))
        ]
        return given[0] or given[1]

    eos, bos = special("eos_token_id"), special("bos_token_id")

    cfg = ModelConfig(
        name=name,
        arch=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        max_position_embeddings=max_pos,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=eos,
        dtype=dtype,
        intermediate_size=positive(hf, "intermediate_size"),
        rms_norm_eps=positive_real(hf, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=flag(hf, "tie_word_embeddings", False),
        generation_defaults=generation_defaults(generation),
        hidden_act=act,
        partial_rotary_factor=_partial_rotary(hf),
    )
    rotary_dim = int(cfg.head_dim * cfg.partial_rotary_factor)
    if rotary_dim % 2:
        raise InputError("config.json:partial_rotary_factor", f"gives an odd rotary width {rotary_dim}")
    cfg.layer_windows = _sliding_windows(hf, arch, num_layers)
    return cfg


# Families whose configs have no use_sliding_window: a sliding_window alone turns the window on.
SLIDE_WITHOUT_FLAG = {
    "MixtralForCausalLM",
    "MistralForCausalLM",
    "Phi3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
}


def _sliding_windows(hf: dict[str, Any], arch: str, num_layers: int) -> list[int | None]:
    """Each layer's sliding window (None: full attention). config.json's `layer_types` decides which layers
    slide when present; otherwise every layer does (arch files narrow that to their own rule)."""
    window = hf.get("sliding_window")
    if not flag(hf, "use_sliding_window", arch in SLIDE_WITHOUT_FLAG) or window is None:
        return [None] * num_layers
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise InputError("config.json:sliding_window", f"must be a positive integer or null, got {window!r}")
    types = hf.get("layer_types")
    if isinstance(types, list) and len(types) == num_layers:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * num_layers


def read_moe(cfg: ModelConfig, hf: dict[str, Any], experts_key: str, intermediate_key: str) -> None:
    """Expert count, top-k and expert width (field names differ per architecture)."""
    cfg.num_experts = positive(hf, experts_key)
    cfg.top_k = positive(hf, "num_experts_per_tok")
    if cfg.top_k > cfg.num_experts:
        raise InputError(
            "config.json:num_experts_per_tok", f"must be at most {experts_key}={cfg.num_experts}"
        )
    cfg.moe_intermediate_size = positive(hf, intermediate_key)


def read_qwen_moe_layers(cfg: ModelConfig, hf: dict[str, Any]) -> None:
    """Qwen's rule: layer i is MoE unless listed in mlp_only_layers or (i + 1) % decoder_sparse_step != 0."""
    step = positive(hf, "decoder_sparse_step", 1)
    dense = hf.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
        raise InputError("config.json:mlp_only_layers", f"expected a list of layer indices, got {dense!r}")
    cfg.moe_layers = [i for i in range(cfg.num_layers) if i not in dense and (i + 1) % step == 0]
    cfg.num_moe_layers = len(cfg.moe_layers)
