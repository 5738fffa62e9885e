"""Write a float Hugging Face checkpoint as a GPTQ, AWQ or compressed-tensors one (round-to-nearest on each
format's grid), and the float checkpoint those integers stand for: the reference a loader of the quantized
one must match.

For tests and benchmarks: real quantizers (GPTQ's error feedback, AWQ's scaling search) pick better
integers, but store them in exactly this layout.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from meshserve.errors import InputError
from meshserve.models.quant.awq import quantize_awq
from meshserve.models.quant.compressed import quantize_compressed
from meshserve.models.quant.gptq import quantize_gptq

# The linear layers the formats quantize: attention and MLP projections, and per-expert w1/w2/w3 (the router
# `gate`, embeddings, norms and lm_head stay float).
LINEAR = re.compile(r"\.layers\.\d+\..*(proj|experts\.\d+\.w[123])\.weight$")
# Layers fed the same input share GPTQ's act-order (it sorts K by that input's Hessian diagonal).
SAME_INPUT = ((r"\.[qkv]_proj\.", ".qkv."), (r"\.(gate|up)_proj\.", ".gate_up."), (r"\.w[13]\.", ".w13."))


def _act_order(name: str, k: int) -> torch.Tensor:
    """A stand-in for GPTQ's act-order: a permutation of K, the same for layers that share an input."""
    site = name
    for pattern, shared in SAME_INPUT:
        site = re.sub(pattern, shared, site)
    return torch.randperm(k, generator=torch.Generator().manual_seed(zlib.crc32(site.encode())))


def export_quantized(
    src: str | Path,
    dst: str | Path,
    reference: str | Path,
    method: str,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    checkpoint_format: str = "gptq",
    lm_head: bool = False,
) -> None:
    """`src` (a float model directory) -> `dst` in `method` ("gptq" or "awq") format and `reference`, a float
    copy of `src` whose quantized layers hold the values dst's integers stand for. lm_head (GPTQ, a model
    with its own lm_head.weight): quantize the head too, as GPTQModel's ``lm_head=True`` writes it."""
    if method not in ("gptq", "awq", "compressed-tensors"):
        raise InputError("method", f"unsupported {method!r}; allowed: gptq, awq, compressed-tensors")
    if lm_head and method != "gptq":
        raise InputError("lm_head", f"a quantized lm_head is written for gptq only, not {method}")
    src, dst, reference = Path(src), Path(dst), Path(reference)
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors |= load_file(str(file))
    if lm_head and "lm_head.weight" not in tensors:
        raise InputError("lm_head", f"{src} ties lm_head to the embedding: there is no lm_head.weight")
    packed, dense = {}, {}
    for name, w in tensors.items():
        if not (LINEAR.search(name) or (lm_head and name == "lm_head.weight")):
            packed[name] = dense[name] = w
            continue
        stem = name.removesuffix(".weight")
        if method == "compressed-tensors":
            parts, values = quantize_compressed(w, bits, group_size, sym)
        elif method == "gptq":
            perm = _act_order(name, w.shape[1]) if desc_act else None
            parts, values = quantize_gptq(w, bits, group_size, sym, perm, int(checkpoint_format == "gptq"))
        else:
            parts, values = quantize_awq(w, group_size)
        packed |= {f"{stem}.{p}": t for p, t in parts.items()}
        dense[name] = values.to(w.dtype)
    config = json.loads((src / "config.json").read_text())
    quant = {"quant_method": method, "bits": bits, "group_size": group_size}
    if method == "compressed-tensors":
        weights = {"num_bits": bits, "type": "int", "symmetric": sym, "actorder": None}
        weights |= (
            {"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}
        )
        groups = {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}}
        quant = {
            "quant_method": method,
            "format": "pack-quantized",
            "config_groups": groups,
            "ignore": ["lm_head"],
        }
    elif method == "gptq":
        quant |= {
            "desc_act": desc_act,
            "sym": sym,
            "checkpoint_format": checkpoint_format,
            "lm_head": lm_head,
        }
    else:
        quant |= {"zero_point": True, "version": "gemm"}
    for out, data, cfg in (
        (dst, packed, {**config, "quantization_config": quant}),
        (reference, dense, config),
    ):
        out.mkdir(parents=True, exist_ok=True)
        for file in src.iterdir():
            if file.suffix != ".safetensors" and file.name not in (
                "config.json",
                "model.safetensors.index.json",
            ):
                shutil.copy(file, out / file.name)
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(
            {k: v.contiguous() for k, v in data.items()}, str(out / "model.safetensors"), {"format": "pt"}
        )
