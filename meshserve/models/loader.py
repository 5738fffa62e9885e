"""load_model: a Hugging Face-format directory -> model, config and tokenizer ready for the engine."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meshserve.errors import InputError
from meshserve.machine import available_memory
from meshserve.memory import MemoryNeed, check_memory
from meshserve.models.config import AUTO, ModelConfig, parse_config, parse_dtype, resolve_aliases
from meshserve.models.decoder import DecoderLM
from meshserve.models.hub import resolve_model
from meshserve.models.pooling_config import read_pooling
from meshserve.models.quant.config import resolve_quantization
from meshserve.models.quant.layout import quantize_layout, quantized_bytes
from meshserve.models.registry import ARCHITECTURES
from meshserve.models.tokenizer import Tokenizer
from meshserve.models.weights import load_weights


@dataclass
class LoadedModel:
    """What the engine gets: the torch module, its config, and its tokenizer."""

    model: DecoderLM
    config: ModelConfig
    tokenizer: Tokenizer


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise InputError(path.name, f"missing from {path.parent}")
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path.name, f"invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise InputError(path.name, "expected a JSON object")
    return data


def _architecture(hf: dict[str, Any]) -> str:
    names = hf.get("architectures")
    supported = ", ".join(ARCHITECTURES)
    if not isinstance(names, list) or not names:
        raise InputError("config.json:architectures", f"missing; supported: {supported}")
    for name in names:
        if name in ARCHITECTURES:
            return name
    raise InputError("config.json:architectures", f"unsupported {names}; supported: {supported}")


def meta_model(config: ModelConfig) -> DecoderLM:
    """The model of `config` with its parameters on the meta device in its dtype (float32 in modules that
    set ``keeps_float32``): shapes only, nothing allocated. Buffers keep theirs (the rotary frequencies
    stay float32, as in transformers)."""
    with torch.device("meta"):
        model = ARCHITECTURES[config.arch](config)
    typed: dict[int, nn.Parameter] = {}  # by the original's id: a tied parameter stays one parameter
    for module in model.modules():
        # a module that computes in float32 whatever the model's dtype says so (DeepSeek's router gate)
        dtype = torch.float32 if getattr(module, "keeps_float32", False) else config.dtype
        for name, p in list(module._parameters.items()):
            if p is not None:
                typed.setdefault(id(p), nn.Parameter(p.to(dtype), requires_grad=False))
                module._parameters[name] = typed[id(p)]
    if config.quantization is not None:  # quantized layers in their packed form (models/quant/layout.py)
        quantize_layout(model, config.quantization, config.dtype, config.tie_word_embeddings)
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights: its parameters plus its quantized layers' packed buffers."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) + quantized_bytes(model)


def weight_bytes(config: ModelConfig) -> int:
    """Bytes of the model's weights in its dtype (quantized layers at their packed size)."""
    return model_bytes(meta_model(config))


def load_config(
    path: str | Path,
    dtype: str | torch.dtype = AUTO,
    revision: str | None = None,
    quantization: str | None = None,
    quantize_lm_head: bool | None = None,
) -> tuple[ModelConfig, Tokenizer]:
    """The model's config and tokenizer from `path` (a directory, or a model id in the local Hugging Face
    cache at `revision`), without reading any weights. dtype "auto" is the checkpoint's own; quantization
    None is the checkpoint's own (its quantization_config, if any), else one of quant.config.METHODS;
    quantize_lm_head None is that method's default (quant.config.resolve_quantization)."""
    path = resolve_model(path, revision)
    hf = _read_json(path / "config.json", required=True)
    torch_dtype = parse_dtype(dtype, hf)
    generation = _read_json(path / "generation_config.json", required=False)
    arch = _architecture(hf)
    cls = ARCHITECTURES[arch]
    hf = resolve_aliases(hf, cls.config_aliases)
    config = parse_config(hf, arch, name=_name(path), dtype=torch_dtype, generation=generation)
    cls.configure(config, hf)
    config.quantization = resolve_quantization(quantization, hf, quantize_lm_head)
    config.pooling_defaults = read_pooling(path)
    if config.headless:  # no LM head to load: the forward's logits read the input embedding
        config.tie_word_embeddings = True
    tokenizer = Tokenizer.from_dir(path, config.bos_token_id, config.eos_token_ids)
    if not config.eos_token_ids:
        config.eos_token_ids = list(tokenizer.eos_token_ids)
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    if not config.eos_token_ids:  # without one, every request runs to max_tokens
        raise InputError(
            "config.json:eos_token_id",
            "no end-of-sequence token: set eos_token_id in "
            "config.json or generation_config.json, or eos_token in "
            "tokenizer_config.json",
        )
    return config, tokenizer


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = AUTO,
    revision: str | None = None,
    check_fits: bool = True,
    quantization: str | None = None,
    quantize_lm_head: bool | None = None,
) -> LoadedModel:
    """Load config.json, safetensors weights (single or sharded) and tokenizer.json from `path` (see
    load_config and build_model); unless ``check_fits`` is off (the caller checked more), the weights must
    fit the memory available first."""
    config, tokenizer = load_config(path, dtype, revision, quantization, quantize_lm_head)
    if check_fits:
        check_memory(MemoryNeed(weights=weight_bytes(config)), available_memory(), "config.json")
    return LoadedModel(model=build_model(config, path, revision), config=config, tokenizer=tokenizer)


def build_model(config: ModelConfig, path: str | Path, revision: str | None = None) -> DecoderLM:
    """The model of `config` (from load_config) with its weights from `path`: built on the meta device,
    each weight then read once into its final dtype and layout (weights.py)."""
    model = meta_model(config)
    load_weights(model, resolve_model(path, revision))
    return model.eval()


def _name(path: Path) -> str:
    """The model's display name: Org/Name for a Hugging Face cache snapshot, else the directory's name."""
    repo = path.parent.parent.name if path.parent.name == "snapshots" else ""
    return repo.removeprefix("models--").replace("--", "/") if repo.startswith("models--") else path.name
