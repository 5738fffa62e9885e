"""make_tiny_model: small random Hugging Face-format models for tests and benchmarks (nothing downloaded).

The directory holds what a real checkpoint holds (config.json, safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) in the classic Hugging Face tensor names, so both
meshserve and `transformers` load it. Weights use std 0.08 rather than the usual 0.02 so the top
logits are well apart: with near-flat logits harmless float reassociation flips greedy choices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from meshserve.atomic import atomic_path
from meshserve.engine.kv_cache import allocate_kv_cache
from meshserve.engine.runner import batch_metadata
from meshserve.errors import InputError
from meshserve.models.loader import LoadedModel
from meshserve.training.corpus import BOS_ID, EOS_ID, SPECIAL_TOKENS, train_tokenizer  # one BPE recipe

WEIGHT_STD = 0.08
# DeepSeek routers' weights x this, so near-tied expert choices (which bfloat16 flips) are rare. It lowers the
# odds, not to zero: at 4.0 one token of test_bfloat16_runs_close_to_transformers flipped an expert once rope
# stopped reading bfloat16-rounded frequencies (its row 0.82 from float32 transformers, others within 0.05).
ROUTER_SPREAD = 6.0

_COMMON: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "initializer_range": 0.02,
    "use_cache": True,
}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False},
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": None,
        "router_jitter_noise": 0.0,
    },
    "qwen2_moe": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        **_MOE,
        "shared_expert_intermediate_size": 96,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": False,
        "use_sliding_window": False,
    },
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        **_MOE,
        "head_dim": 16,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "attention_bias": False,
        "use_sliding_window": False,
    },
}
# DeepSeek: MLA (latent 48 + rope 16 = the 64-wide rows the native op's fast tiles take), grouped routing.
_DEEPSEEK = {
    "kv_lora_rank": 48,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 16,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "routed_scaling_factor": 2.5,
}
ARCHS["deepseek_v2"] = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    **_DEEPSEEK,
    "q_lora_rank": None,
    "topk_method": "group_limited_greedy",
    "n_group": 4,
    "topk_group": 2,
    "norm_topk_prob": False,
}
ARCHS["deepseek_v3"] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    **_DEEPSEEK,
    "q_lora_rank": 32,
    "n_group": 4,
    "topk_group": 2,
    "norm_topk_prob": True,
    "rope_interleave": True,
    "num_nextn_predict_layers": 0,
}

_GEMMA = {
    "head_dim": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 24,  # not head_dim, so a scale taken from head_dim shows
    "sliding_window": 8,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
}
ARCHS.update(
    {
        "llama3": {  # Llama 3.1+: llama3 rope scaling (an original context small enough to matter here)
            **ARCHS["llama"],
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rope_theta": 500000.0,
        },
        "mistral": {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "head_dim": 24,  # explicit and not hidden / heads, as Mistral-Nemo saves it
            "sliding_window": None,
        },
        "qwen3": {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "head_dim": 16,
            "attention_bias": False,
            "use_sliding_window": False,
        },
        "gemma2": {
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            **_GEMMA,
            "attn_logit_softcapping": 5.0,  # small caps: the tiny model's scores and logits reach them
            "final_logit_softcapping": 10.0,
        },
        "gemma3": {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            **_GEMMA,
            "sliding_window_pattern": 2,  # layer 0 slides, layer 1 is global
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
        },
        "phi3": {  # Phi-4-mini's shape: partial rotary and LongRoPE
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 32,
            "rope_scaling": {
                "type": "longrope",
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
            },
            "sliding_window": None,
            "pad_token_id": 0,
        },
        "olmoe": {
            "architectures": ["OlmoeForCausalLM"],
            "model_type": "olmoe",
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": 64,
            "norm_topk_prob": False,
            "clip_qkv": None,
            "pad_token_id": 0,
        },
        "granitemoe": {  # granite-3.0-1b-a400m's multipliers
            "architectures": ["GraniteMoeForCausalLM"],
            "model_type": "granitemoe",
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": 64,
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 0.015625,
            "logits_scaling": 6.0,
        },
    }
)

# Text the byte-level BPE learns its merges from (any fixed text works; this one is about the project).
_CORPUS = """meshserve serves large language models. Every step packs prefill chunks, decode tokens and
verify tokens of many requests into one token budget, runs one forward pass over the flat batch, and
samples the next token of every request. The paged key value cache holds blocks of sixteen tokens;
block tables map each sequence to its blocks. Mixture of experts layers route every token to the top
experts; the router records how many tokens each expert receives, and the wafer simulator replays
those traces to plan where experts live on a mesh of dies. The quick brown fox jumps over the lazy
dog. Hello world! Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and punctuation, (brackets) [lists] {maps}.
"""


def _tensor_shapes(cfg: dict[str, Any], arch: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, named as Hugging Face names them, with its shape."""
    h, v, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    qkv_bias = arch in ("qwen2", "qwen2_moe") or cfg.get("attention_bias", False)

    def mlp(
        prefix: str, width: int, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    ) -> None:
        if arch == "phi3":  # Phi-3 checkpoints hold gate and up fused
            shapes[f"{prefix}.gate_up_proj.weight"] = (2 * width, h)
        else:
            shapes[f"{prefix}.{names[0]}.weight"] = (width, h)
            shapes[f"{prefix}.{names[1]}.weight"] = (width, h)
        shapes[f"{prefix}.{names[2]}.weight"] = (h, width)

    if arch.startswith("deepseek"):
        return _deepseek_shapes(cfg, shapes, mlp)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        if arch.startswith("gemma"):
            shapes[f"{p}.pre_feedforward_layernorm.weight"] = (h,)
            shapes[f"{p}.post_feedforward_layernorm.weight"] = (h,)
        if arch == "phi3":
            shapes[f"{p}.self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
        for name, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)) if arch != "phi3" else ():
            shapes[f"{p}.self_attn.{name}.weight"] = (size, h)
            if qkv_bias:
                shapes[f"{p}.self_attn.{name}.bias"] = (size,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, q)
        if cfg.get("attention_bias", False):
            shapes[f"{p}.self_attn.o_proj.bias"] = (h,)
        if arch in ("qwen3_moe", "qwen3", "gemma3"):
            shapes[f"{p}.self_attn.q_norm.weight"] = shapes[f"{p}.self_attn.k_norm.weight"] = (d,)
        if arch == "olmoe":  # one norm over all heads
            shapes[f"{p}.self_attn.q_norm.weight"], shapes[f"{p}.self_attn.k_norm.weight"] = (q,), (kv,)
        if arch == "mixtral":
            shapes[f"{p}.block_sparse_moe.gate.weight"] = (cfg["num_local_experts"], h)
            for e in range(cfg["num_local_experts"]):
                mlp(f"{p}.block_sparse_moe.experts.{e}", inter, ("w1", "w3", "w2"))
        elif arch == "granitemoe":  # experts stacked, [gate; up] in one
            e = cfg["num_local_experts"]
            shapes[f"{p}.block_sparse_moe.router.layer.weight"] = (e, h)
            shapes[f"{p}.block_sparse_moe.input_linear.weight"] = (e, 2 * inter, h)
            shapes[f"{p}.block_sparse_moe.output_linear.weight"] = (e, h, inter)
        elif arch == "olmoe":
            shapes[f"{p}.mlp.gate.weight"] = (cfg["num_experts"], h)
            for e in range(cfg["num_experts"]):
                mlp(f"{p}.mlp.experts.{e}", inter)
        elif arch in ("qwen2_moe", "qwen3_moe") and _is_moe_layer(cfg, i):
            shapes[f"{p}.mlp.gate.weight"] = (cfg["num_experts"], h)
            for e in range(cfg["num_experts"]):
                mlp(f"{p}.mlp.experts.{e}", cfg["moe_intermediate_size"])
            if arch == "qwen2_moe":
                mlp(f"{p}.mlp.shared_expert", cfg["shared_expert_intermediate_size"])
                shapes[f"{p}.mlp.shared_expert_gate.weight"] = (1, h)
        else:
            mlp(f"{p}.mlp", inter)
    return shapes


def _deepseek_shapes(cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]], mlp: Any) -> dict:
    """DeepSeek-V2/V3 tensors: MLA projections, grouped-router gate (+ correction bias for noaux_tc), shared
    experts, and the MTP layers past the last decoder layer (num_nextn_predict_layers) a V3 checkpoint has."""
    h, heads, rope = cfg["hidden_size"], cfg["num_attention_heads"], cfg["qk_rope_head_dim"]
    qk, latent, experts = cfg["qk_nope_head_dim"] + rope, cfg["kv_lora_rank"], cfg["n_routed_experts"]
    noaux = (
        cfg.get("topk_method", "noaux_tc" if cfg["model_type"] == "deepseek_v3" else "greedy") == "noaux_tc"
    )
    layers = cfg["num_hidden_layers"]
    for i in range(layers + cfg.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        a = f"{p}.self_attn"
        if cfg.get("q_lora_rank"):
            shapes[f"{a}.q_a_proj.weight"] = (cfg["q_lora_rank"], h)
            shapes[f"{a}.q_a_layernorm.weight"] = (cfg["q_lora_rank"],)
            shapes[f"{a}.q_b_proj.weight"] = (heads * qk, cfg["q_lora_rank"])
        else:
            shapes[f"{a}.q_proj.weight"] = (heads * qk, h)
        shapes[f"{a}.kv_a_proj_with_mqa.weight"] = (latent + rope, h)
        shapes[f"{a}.kv_a_layernorm.weight"] = (latent,)
        shapes[f"{a}.kv_b_proj.weight"] = (heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), latent)
        shapes[f"{a}.o_proj.weight"] = (h, heads * cfg["v_head_dim"])
        if i < cfg.get("first_k_dense_replace", 0):
            mlp(f"{p}.mlp", cfg["intermediate_size"])
            continue
        shapes[f"{p}.mlp.gate.weight"] = (experts, h)
        if noaux:
            shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (experts,)
        for e in range(experts):
            mlp(f"{p}.mlp.experts.{e}", cfg["moe_intermediate_size"])
        if cfg.get("n_shared_experts"):
            mlp(f"{p}.mlp.shared_experts", cfg["moe_intermediate_size"] * cfg["n_shared_experts"])
        if i >= layers:  # an MTP layer's own tensors
            shapes[f"{p}.enorm.weight"] = shapes[f"{p}.hnorm.weight"] = (h,)
            shapes[f"{p}.eh_proj.weight"] = (h, 2 * h)
            shapes[f"{p}.shared_head.norm.weight"] = (h,)
    return shapes


def _stack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`<layer>.experts.<e>.{gate,up,down}_proj.weight` -> `<layer>.experts.gate_up_proj` [E, 2I, H] and
    `<layer>.experts.down_proj` [E, H, I], in the original order otherwise."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        stem, sep, rest = name.partition(".experts.")
        expert, _, leaf = rest.partition(".")
        if not sep or not expert.isdigit():
            out[name] = t
        elif expert == "0" and leaf == "gate_proj.weight":
            count = sum(
                1 for n in tensors if n.startswith(f"{stem}.experts.") and n.endswith(".down_proj.weight")
            )
            part = [
                [tensors[f"{stem}.experts.{e}.{p}.weight"] for e in range(count)]
                for p in ("gate_proj", "up_proj", "down_proj")
            ]
            out[f"{stem}.experts.gate_up_proj"] = torch.cat(
                (torch.stack(part[0]), torch.stack(part[1])), dim=1
            )
            out[f"{stem}.experts.down_proj"] = torch.stack(part[2])
    return out


def _is_moe_layer(cfg: dict[str, Any], i: int) -> bool:
    return i not in (cfg.get("mlp_only_layers") or []) and (i + 1) % cfg.get("decoder_sparse_step", 1) == 0


def _random_tensors(
    shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Normal(0, WEIGHT_STD) weights and biases; norm scales near 1 (randomised, so a missed norm shows)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen) * WEIGHT_STD
        if name.endswith("norm.weight"):
            t = 1.0 + t
        tensors[name] = t.to(dtype).contiguous()
    return tensors


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def make_tiny_model(
    path: str | Path,
    arch: str = "llama",
    seed: int = 0,
    dtype: str = "float32",
    num_shards: int = 1,
    stacked_experts: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a small random `arch` model to `path` (created; its files are replaced) and return the path.

    config_overrides are config.json fields, e.g. hidden_size=512, num_hidden_layers=8.
    num_shards > 1 splits the weights over several files with a model.safetensors.index.json.
    stacked_experts writes each MoE layer's experts as two stacked tensors (transformers v5's layout, gate/up
    names only): a few tensors instead of three per expert, so many-expert models write and load fast.
    """
    if arch not in ARCHS:
        raise InputError("arch", f"unknown {arch!r}; allowed: {', '.join(ARCHS)}")
    if dtype not in ("float32", "bfloat16"):
        raise InputError("dtype", f"unsupported {dtype!r}; allowed: float32, bfloat16")
    cfg = {**_COMMON, **ARCHS[arch], **config_overrides, "torch_dtype": dtype}
    if arch == "mixtral" and "num_experts" in cfg:  # accept the Qwen spelling for Mixtral too
        cfg["num_local_experts"] = cfg.pop("num_experts")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tensors = _random_tensors(_tensor_shapes(cfg, arch), seed, getattr(torch, dtype))
    if arch.startswith("gemma"):  # Gemma stores each norm's scale minus one
        tensors = {n: t - 1 if n.endswith("norm.weight") else t for n, t in tensors.items()}
    if arch.startswith("deepseek"):  # sigmoid / grouped scores sit close together: spread the router's logits
        for name in [n for n in tensors if n.endswith("mlp.gate.weight")]:
            tensors[name] = tensors[name] * ROUTER_SPREAD
    if stacked_experts:
        tensors = _stack_experts(tensors)
    names = list(tensors)
    num_shards = max(1, min(num_shards, len(names)))
    if num_shards == 1:
        _save(tensors, path / "model.safetensors")
    else:
        weight_map = {}
        for s in range(num_shards):
            file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
            shard = {n: tensors[n] for n in names[s::num_shards]}
            _save(shard, path / file)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(
            path / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )

    _write_json(path / "config.json", cfg)
    _write_json(path / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID})
    train_tokenizer([_CORPUS] * 4, cfg["vocab_size"]).save(str(path / "tokenizer.json"))
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS[BOS_ID],
            "eos_token": SPECIAL_TOKENS[EOS_ID],
            "pad_token": SPECIAL_TOKENS[0],
            "model_max_length": cfg["max_position_embeddings"],
        },
    )
    return path


def _save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Write to a temp file and rename, so a crash never leaves half a checkpoint."""
    with atomic_path(file) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


class PagedSequences:
    """A minimal paged-KV driver for model tests: no scheduler, the caller says what each step runs.

    Blocks are handed out in a shuffled order so sequences' blocks are never contiguous, which is
    what a real cache looks like after a while.
    """

    def __init__(self, lm: LoadedModel, num_blocks: int = 64, block_size: int = 4, seed: int = 0) -> None:
        cfg = lm.config
        self.lm, self.block_size = lm, block_size
        self.kv_caches = allocate_kv_cache(
            cfg.num_layers,
            num_blocks,
            block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.dtype,
            parts=cfg.kv_cache_parts,
        )
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tokens: list[list[int]] = []
        self.computed: list[int] = []
        self.blocks: list[list[int]] = []

    def add(self, token_ids: list[int]) -> int:
        """Register a sequence; returns its id."""
        self.tokens.append(list(token_ids))
        self.computed.append(0)
        self.blocks.append([])
        return len(self.tokens) - 1

    def step(self, work: dict[int, int]) -> dict[int, torch.Tensor]:
        """Run the next n uncomputed tokens of each sequence {seq: n} in one flat forward.

        Returns each sequence's logits [n, vocab] (float32), one row per token it ran.
        """
        seqs = list(work)
        n = np.array([work[s] for s in seqs], dtype=np.int64)
        begin = np.array([self.computed[s] for s in seqs], dtype=np.int64)
        for seq, end in zip(seqs, begin + n, strict=True):
            while len(self.blocks[seq]) * self.block_size < end:
                self.blocks[seq].append(self.free.pop())
            self.computed[seq] = int(end)
        meta = batch_metadata(begin, n, n, [self.blocks[s] for s in seqs], self.block_size)
        ids = [torch.tensor(self.tokens[s][b : b + k]) for s, b, k in zip(seqs, begin, n, strict=True)]
        hidden = self.lm.model(torch.cat(ids), meta, self.kv_caches)
        logits = self.lm.model.compute_logits(hidden[meta.logits_indices])
        starts = meta.query_start_loc.tolist()
        return {seq: logits[starts[i] : starts[i + 1]] for i, seq in enumerate(seqs)}


@dataclass
class CliResult:
    """What a user sees from one `meshserve ...` run: exit code, stdout, stderr."""

    code: int
    out: str
    err: str


def run_cli(args: list[str], stdin: str = "") -> CliResult:
    """Run `meshserve ARGS` in this process exactly as the console entry point does (``cli.main``)."""
    import contextlib
    import io
    import sys

    from meshserve.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_argv, old_stdin = sys.argv, sys.stdin
    sys.argv, sys.stdin = ["meshserve", *args], io.StringIO(stdin)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv, sys.stdin = old_argv, old_stdin
    return CliResult(code, out.getvalue(), err.getvalue())
