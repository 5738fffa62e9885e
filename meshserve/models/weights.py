"""Read safetensors checkpoints (one file or sharded with an index) into a DecoderLM.

Checkpoints may hold tensors as Hugging Face names them (separate q/k/v, gate/up, one tensor per
expert) or already fused (transformers v5 stacked experts); `_resolve` builds each of our parameters
from whichever is present.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from meshserve.errors import InputError
from meshserve.models.decoder import DecoderLM

INDEX = "model.safetensors.index.json"
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Our fused tensors and the checkpoint tensors they concatenate (along dim 0).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class Checkpoint:
    """Lazy access to the tensors of every safetensors file of a model directory."""

    def __init__(self, path: Path) -> None:
        index = path / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
                raise InputError(INDEX, f"not a valid safetensors index ({err})") from None
            ok = isinstance(weight_map, dict) and all(
                isinstance(f, str) and f.endswith(".safetensors") and Path(f).name == f
                for f in weight_map.values()
            )
            if not ok or not weight_map:
                raise InputError(
                    f"{INDEX}:weight_map",
                    "must map tensor names to *.safetensors file names in the model directory",
                )
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                raise InputError("weights", f"no *.safetensors file or {INDEX} in {path}")
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        for name in files:
            if not (path / name).is_file():
                raise InputError(name, f"listed in {INDEX} but missing from {path}")
            try:
                handle = safe_open(str(path / name), framework="pt")
                keys = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as err:
                raise InputError(name, f"corrupt safetensors file ({err})") from None
            self._handles[name] = handle
            self._where.update(dict.fromkeys(keys, name))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        """One tensor, refused when its dtype is not a float we load or it holds NaN / inf."""
        file = self._where[key]
        try:
            tensor = self._handles[file].get_tensor(key)
        except (SafetensorError, OSError, ValueError, TypeError) as err:
            raise InputError(file, f"cannot read tensor {key} ({err})") from None
        if tensor.dtype not in WEIGHT_DTYPES:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in WEIGHT_DTYPES)
            raise InputError(
                f"{file}:{key}",
                f"dtype {str(tensor.dtype).removeprefix('torch.')} is not supported; allowed: {allowed}",
            )
        if not bool(torch.isfinite(tensor).all()):  # one vectorised pass per tensor
            raise InputError(f"{file}:{key}", "holds NaN or infinite values")
        return tensor


def _candidates(name: str, aliases: tuple[tuple[str, str], ...]) -> list[str]:
    base = name if name.startswith("lm_head.") else "model." + name
    return [base] + [base.replace(ours, theirs) for ours, theirs in aliases if ours in base]


def _resolve(name: str, ckpt: Checkpoint, model: DecoderLM) -> torch.Tensor | None:
    """Our parameter `name` from the checkpoint, fusing separate tensors where needed; None if absent."""
    gate, up, down = model.expert_names
    for key in _candidates(name, model.checkpoint_aliases):
        if key in ckpt:
            return ckpt.get(key)
        stem, _, leaf = key.rpartition(".")
        if stem.endswith(".experts") and leaf in ("gate_up_proj", "down_proj"):
            parts = (gate, up) if leaf == "gate_up_proj" else (down,)
            e = 0
            experts = []
            while all(f"{stem}.{e}.{p}.weight" in ckpt for p in parts):
                experts.append(torch.cat([ckpt.get(f"{stem}.{e}.{p}.weight") for p in parts]))
                e += 1
            if experts:
                return torch.stack(experts)
            continue
        owner, _, fused = stem.rpartition(".")
        parts = [f"{owner}.{p}.{leaf}" for p in {**FUSED, **model.fusions}.get(fused, ())]
        if parts and all(p in ckpt for p in parts):
            return torch.cat([ckpt.get(p) for p in parts])
    return None


def _missing_keys(name: str, ckpt: Checkpoint, model: DecoderLM) -> list[str]:
    """The checkpoint names we looked for under Hugging Face's classic naming and did not find."""
    key = _candidates(name, model.checkpoint_aliases)[-1]
    stem, _, leaf = key.rpartition(".")
    owner, _, fused = stem.rpartition(".")
    if stem.endswith(".experts"):
        return [f"{stem}.<expert>.{leaf}.weight"]
    parts = [f"{owner}.{p}.{leaf}" for p in {**FUSED, **model.fusions}.get(fused, ())] or [key]
    return [p for p in parts if p not in ckpt]


def load_weights(model: DecoderLM, path: Path) -> None:
    """Copy every parameter of `model` from the checkpoint in `path`; InputError names what is missing."""
    ckpt = Checkpoint(path)
    missing = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            tensor = _resolve(name, ckpt, model)
            if tensor is None:
                missing += _missing_keys(name, ckpt, model)
                continue
            if tensor.shape != param.shape:
                raise InputError(
                    "weights", f"{name}: shape {list(tensor.shape)}, expected {list(param.shape)}"
                )
            param.copy_(tensor)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError("weights", f"missing tensors: {shown}")
