"""Filling a model's quantized layers from a checkpoint: packed formats read straight into QuantWeights (no
dense copy), float checkpoints quantized layer by layer as they are read (one layer's dense copy at a time).

The checkpoint lookups come from weights.py as two callables, so this module does not import it:
``find(name)`` gives the (key, index) parts and shape that fill our dense parameter `name`,
``candidates(name)`` the checkpoint names it may have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from meshserve.errors import InputError
from meshserve.kernels.quant_weight import QuantWeight, quantize_int4, quantize_int8
from meshserve.models.layers.quant_experts import QuantExperts
from meshserve.models.layers.quant_linear import QuantLinear
from meshserve.models.quant import awq, compressed, gptq
from meshserve.models.quant.config import QuantConfig, head_config
from meshserve.models.quant.layout import group_size
from meshserve.models.quant.merge import concat_rows, stack_experts

Find = Callable[[str], Any]


def _dense(ckpt: Any, find: Find, name: str, dtype: torch.dtype) -> torch.Tensor:
    found = find(name)
    if found is None:
        raise InputError("weights", f"missing tensors for {name}")
    parts, shape = found
    data = torch.empty(shape, dtype=dtype)
    for key, index in parts:
        ckpt.copy_into(key, data[index])
    return data


def _at_load(dense: torch.Tensor, qc: QuantConfig, name: str) -> QuantWeight:
    if qc.method == "int8":
        return quantize_int8(dense)
    return quantize_int4(dense, group_size(qc, dense.shape[-1], name))


# Each format's tensors of one layer (the first names the layer), and those it may leave out.
PARTS = {"gptq": gptq.PARTS, "awq": awq.PARTS, "compressed-tensors": compressed.PARTS}
OPTIONAL = ("g_idx", *compressed.OPTIONAL)


def _packed(ckpt: Any, stem: str, qc: QuantConfig) -> QuantWeight:
    """One checkpoint layer `stem` (its name without the format's first part) in its own format."""
    names = PARTS[qc.method]
    tensors = {p: ckpt.read(f"{stem}.{p}") for p in names if f"{stem}.{p}" in ckpt}
    missing = [f"{stem}.{p}" for p in names if p not in OPTIONAL and p not in tensors]
    if missing:
        raise InputError("weights", f"missing tensors: {', '.join(missing)}")
    try:
        if qc.method == "gptq":
            return gptq.read_gptq(tensors, qc.bits, qc.group_size, qc.zero_offset)
        if qc.method == "compressed-tensors":
            return compressed.read_compressed(tensors, qc.bits, qc.group_size)
        return awq.read_awq(tensors, qc.group_size)
    except ValueError as err:
        raise InputError(f"{stem}.{names[0]}", str(err)) from None


def _linear(ckpt: Any, find: Find, name: str, qc: QuantConfig, dtype: torch.dtype) -> QuantWeight:
    if qc.at_load:
        return _at_load(_dense(ckpt, find, f"{name}.weight", dtype), qc, name)
    anchor = PARTS[qc.method][0]
    found = find(f"{name}.{anchor}")  # fused layers: the q/k/v (gate/up) parts, in order
    if found is None:
        raise InputError("weights", f"missing tensors: {name}.{anchor} (a {qc.method} checkpoint)")
    stems = [key.removesuffix(f".{anchor}") for key, _ in found[0]]
    try:
        return concat_rows([_packed(ckpt, s, qc) for s in stems], name)
    except ValueError as err:
        raise InputError(f"{name}.{anchor}", str(err)) from None


def _experts(
    ckpt: Any,
    find: Find,
    candidates: Find,
    name: str,
    module: QuantExperts,
    qc: QuantConfig,
    dtype: torch.dtype,
    expert_names: tuple[str, str, str],
) -> tuple[QuantWeight, QuantWeight]:
    if qc.at_load:
        return tuple(
            _at_load(_dense(ckpt, find, f"{name}.{w}", dtype), qc, name)
            for w in ("gate_up_proj", "down_proj")
        )
    gate, up, down = expert_names
    count = module.num_experts
    anchor = PARTS[qc.method][0]
    for base in candidates(f"{name}.gate_up_proj"):
        stem = base.rpartition(".")[0]
        if f"{stem}.0.{gate}.{anchor}" in ckpt:
            try:
                gate_up = [
                    concat_rows([_packed(ckpt, f"{stem}.{e}.{p}", qc) for p in (gate, up)])
                    for e in range(count)
                ]
                downs = [_packed(ckpt, f"{stem}.{e}.{down}", qc) for e in range(count)]
                return stack_experts(gate_up, name), stack_experts(downs, name)
            except ValueError as err:
                raise InputError(f"{stem}.{anchor}", str(err)) from None
    raise InputError(
        "weights", f"missing tensors: {name}.<expert>.{gate}.{anchor} (a {qc.method} checkpoint)"
    )


def fill_quantized(
    model: nn.Module, ckpt: Any, qc: QuantConfig, find: Find, candidates: Find, dtype: torch.dtype
) -> None:
    """Give every QuantLinear and QuantExperts of `model` its weights from `ckpt` (a quantized lm_head made
    at load from a tied checkpoint reads the input embedding: the checkpoint has no lm_head.weight)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            layer_qc, source = qc, name
            if name == "lm_head":
                layer_qc = head_config(qc)
                if layer_qc.at_load and model.config.tie_word_embeddings:
                    source = "embed_tokens"
            module.set_weight(_linear(ckpt, find, source, layer_qc, dtype))
        elif isinstance(module, QuantExperts):
            module.set_weights(*_experts(ckpt, find, candidates, name, module, qc, dtype, model.expert_names))
