"""Which layers a QuantConfig quantizes, and their quantized modules built in place on the meta device."""

from __future__ import annotations

import math

import torch
from torch import nn

from meshserve.errors import InputError
from meshserve.kernels.quant_weight import QuantWeight
from meshserve.kernels.smooth_gemm import SmoothLinear
from meshserve.models.layers.moe import StackedExperts
from meshserve.models.layers.quant_embedding import QuantEmbedding
from meshserve.models.layers.quant_experts import QuantExperts
from meshserve.models.layers.quant_linear import QuantLinear, empty_quant
from meshserve.models.quant.config import INT4_GROUP, QuantConfig, head_config

# Layers whose dense weight other code reads directly (MLA's absorbed kv_b_proj) stay in the model dtype.
DENSE_ONLY = ("kv_b_proj",)


def group_size(qc: QuantConfig, k: int, layer: str) -> int:
    """The group size along K this layer gets: int8 at load one per row, int4 at load up to INT4_GROUP."""
    if qc.method == "int8":
        return k
    if qc.method == "int4":
        return math.gcd(k, INT4_GROUP)
    group = k if qc.group_size == -1 else qc.group_size
    if k % group:
        raise InputError(
            "config.json:quantization_config.group_size", f"{group} does not divide {layer}'s {k} inputs"
        )
    return group


def _quantized(name: str, qc: QuantConfig) -> bool:
    if name == "lm_head":
        return qc.lm_head
    return not any(part in name for part in (*DENSE_ONLY, *qc.skip))


def _empty(qc: QuantConfig, lead: tuple[int, ...], n: int, k: int, layer: str) -> QuantWeight:
    zeros = qc.method == "int4" or not qc.sym
    return empty_quant(lead, n, k, qc.bits, group_size(qc, k, layer), zeros, qc.desc_act)


def quantize_layout(model: nn.Module, qc: QuantConfig, dtype: torch.dtype, tied: bool) -> None:
    """Swap every quantized SmoothLinear for a QuantLinear and every StackedExperts for QuantExperts (shapes
    only: call on a model built on the meta device; the loader fills them). A quantized lm_head tied to the
    input embedding is its one copy: the embedding becomes a QuantEmbedding that reads the head's rows."""
    with torch.device("meta"):
        for name, module in list(model.named_modules()):
            if isinstance(module, SmoothLinear) and _quantized(name, qc):
                n, k = module.weight.shape
                layer_qc = head_config(qc) if name == "lm_head" else qc
                new = QuantLinear(_empty(layer_qc, (), n, k, name), module.bias, dtype)
            elif isinstance(module, StackedExperts):
                e, n13, k13 = module.gate_up_proj.shape
                _, n2, k2 = module.down_proj.shape
                new = QuantExperts(_empty(qc, (e,), n13, k13, name), _empty(qc, (e,), n2, k2, name))
            else:
                continue
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, new)
        if tied and isinstance(getattr(model, "lm_head", None), QuantLinear):
            model.embed_tokens = QuantEmbedding(model.lm_head)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the quantized layers' packed weights (buffers, so not among the model's parameters)."""
    return sum(m.nbytes for m in model.modules() if isinstance(m, QuantLinear | QuantExperts))


def quantized_split(model: nn.Module) -> tuple[int, int]:
    """(resident bytes of the quantized layers, the bytes those layers would take in bfloat16)."""
    packed = dense = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            packed, dense = packed + m.nbytes, dense + m.in_features * m.out_features * 2
        elif isinstance(m, QuantExperts):
            packed, dense = packed + m.nbytes, dense + m.num_weights * 2
    return packed, dense
