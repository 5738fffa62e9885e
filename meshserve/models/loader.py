"""load_model: a Hugging Face-format directory -> model, config and tokenizer ready for the engine."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from meshserve.errors import InputError
from meshserve.machine import available_memory
from meshserve.models.config import ModelConfig, parse_config, parse_dtype, resolve_aliases
from meshserve.models.decoder import DecoderLM
from meshserve.models.layers.moe import StackedExperts
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


def _check_fits(cls: type[DecoderLM], config: ModelConfig, dtype: torch.dtype) -> None:
    """Size the weights on the meta device first: a config.json can describe a model of any size."""
    with torch.device("meta"):
        need = sum(p.numel() for p in cls(config).parameters()) * dtype.itemsize
    have = available_memory()
    if need > have:
        gib = 1 << 30
        raise InputError(
            "config.json",
            f"describes {need / gib:.1f} GiB of weights ({dtype}), more than the "
            f"{have / gib:.1f} GiB this machine has available",
        )


def load_config(path: str | Path, dtype: str | torch.dtype = "float32") -> tuple[ModelConfig, Tokenizer]:
    """The model's config and tokenizer from `path`, without reading any weights."""
    path = Path(path)
    torch_dtype = parse_dtype(dtype)
    if not path.is_dir():
        raise InputError("model", f"{path} is not a directory")
    hf = _read_json(path / "config.json", required=True)
    generation = _read_json(path / "generation_config.json", required=False)
    arch = _architecture(hf)
    cls = ARCHITECTURES[arch]
    hf = resolve_aliases(hf, cls.config_aliases)
    config = parse_config(hf, arch, name=path.name, dtype=torch_dtype, generation=generation)
    cls.configure(config, hf)
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


def load_model(path: str | Path, dtype: str | torch.dtype = "float32") -> LoadedModel:
    """Load config.json, safetensors weights (single or sharded) and tokenizer.json from `path`."""
    config, tokenizer = load_config(path, dtype)
    cls = ARCHITECTURES[config.arch]
    _check_fits(cls, config, config.dtype)
    model = cls(config)
    load_weights(model, Path(path))
    model.to(config.dtype).requires_grad_(False).eval()
    model.rotary.inv_freq = model.rotary.inv_freq.float()  # frequencies stay float32, as in transformers
    for module in model.modules():
        if isinstance(module, StackedExperts):
            module.transposed_layout()
    return LoadedModel(model=model, config=config, tokenizer=tokenizer)
