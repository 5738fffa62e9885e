"""Which quantization a model loads with: the `quantization=` argument (vLLM's names) against the checkpoint's
config.json ``quantization_config``, checked into one QuantConfig before any weight is read."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from meshserve.errors import InputError

METHODS = ("gptq", "awq", "compressed-tensors", "int8", "int4")
AT_LOAD = ("int8", "int4")  # made from a float checkpoint while it loads
FIELD = "config.json:quantization_config"
BITS = {"gptq": (4, 8), "awq": (4,), "compressed-tensors": (4, 8)}
INT4_GROUP = 128  # quantization="int4": group size along K (clipped to K where K is smaller)


@dataclass(frozen=True)
class QuantConfig:
    """method: one of METHODS; bits and group_size (K for one group per row) of the stored integers.

    desc_act: GPTQ act-order (g_idx reorders K); sym: zero points fixed at 2**(bits-1);
    zero_offset: added to each stored zero (GPTQ's v1 format stores z - 1); lm_head: the head is quantized
    too (``head_config`` says how); lm_head_packed: the checkpoint stores it packed (GPTQ's
    ``lm_head: true``), else it is made at load from the float head; skip: module name fragments left
    unquantized (AWQ's modules_to_not_convert).
    """

    method: str
    bits: int
    group_size: int = -1
    desc_act: bool = False
    sym: bool = True
    zero_offset: int = 0
    lm_head: bool = False
    lm_head_packed: bool = False
    skip: tuple[str, ...] = field(default_factory=tuple)

    @property
    def at_load(self) -> bool:
        return self.method in AT_LOAD


def head_config(qc: QuantConfig) -> QuantConfig:
    """How the lm_head is quantized: in the checkpoint's own format where it ships the head packed (and for
    int8 / int4 at load), else round-to-nearest at load with the checkpoint's bits (int8 per channel, int4
    in groups of INT4_GROUP)."""
    if qc.at_load or qc.lm_head_packed:
        return qc
    return (
        QuantConfig("int8", 8, -1, lm_head=True)
        if qc.bits == 8
        else QuantConfig("int4", 4, INT4_GROUP, lm_head=True)
    )


def resolve_quantization(
    requested: str | None, hf: dict[str, Any], quantize_lm_head: bool | None = None
) -> QuantConfig | None:
    """The QuantConfig for `requested` (None: whatever the checkpoint declares, else none) and config.json.

    quantize_lm_head None takes each format's default: int8 / int4 at load quantize the head (it is the
    largest single GEMV of a decode step at small sizes); GPTQ keeps it as the checkpoint stores it
    (``lm_head``, false by default, as vLLM loads it); AWQ and compressed-tensors keep it float. True
    quantizes a float head at load (``head_config``); False keeps it in the model dtype, which a checkpoint
    that stores it packed cannot do.
    """
    qc = _resolve(requested, hf)
    if qc is None:
        if quantize_lm_head:
            raise InputError("quantize_lm_head", "needs quantization (this model loads unquantized)")
        return None
    if quantize_lm_head is False and qc.lm_head_packed:
        raise InputError(
            "quantize_lm_head",
            f"this {qc.method} checkpoint stores lm_head quantized (quantization_config.lm_head: true); "
            "it loads only quantized",
        )
    head = qc.at_load if quantize_lm_head is None else quantize_lm_head
    return replace(qc, lm_head=qc.lm_head_packed or head)


def _resolve(requested: str | None, hf: dict[str, Any]) -> QuantConfig | None:
    if requested is not None and requested not in METHODS:
        raise InputError("quantization", f"unsupported {requested!r}; allowed: {', '.join(METHODS)}")
    stored = hf.get("quantization_config")
    if stored is not None and not isinstance(stored, dict):
        raise InputError(FIELD, "must be a JSON object")
    method = None if stored is None else stored.get("quant_method")
    if requested in AT_LOAD:
        if stored is not None:
            raise InputError(
                "quantization", f"{requested} quantizes a float checkpoint; this one is {method}"
            )
        return QuantConfig(
            requested, 8 if requested == "int8" else 4, -1 if requested == "int8" else INT4_GROUP
        )
    if stored is None:
        if requested is not None:
            raise InputError("quantization", f"{requested} needs a checkpoint with a quantization_config")
        return None
    if requested is not None and requested != method:
        raise InputError("quantization", f"{requested} requested, but the checkpoint is {method!r}")
    if method == "gptq":
        return _gptq(stored)
    if method == "awq":
        return _awq(stored)
    if method == "compressed-tensors":
        return _compressed(stored)
    supported = ", ".join(m for m in METHODS if m not in AT_LOAD)
    raise InputError(f"{FIELD}.quant_method", f"unsupported {method!r}; supported checkpoints: {supported}")


def _bits(stored: dict[str, Any], method: str, field: str = f"{FIELD}.bits") -> int:
    bits = stored.get("bits", stored.get("w_bit", stored.get("num_bits")))
    allowed = BITS[method]
    if bits not in allowed:
        raise InputError(field, f"{method} with {bits!r} bits is not supported; allowed: {allowed}")
    return bits


def _group(stored: dict[str, Any]) -> int:
    group = stored.get("group_size", stored.get("q_group_size", -1))
    if not isinstance(group, int) or isinstance(group, bool) or (group < 1 and group != -1):
        raise InputError(
            f"{FIELD}.group_size", f"must be a positive integer or -1 (one group), got {group!r}"
        )
    return group


def _gptq(stored: dict[str, Any]) -> QuantConfig:
    fmt = stored.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise InputError(f"{FIELD}.checkpoint_format", f"unsupported {fmt!r}; allowed: gptq, gptq_v2")
    return QuantConfig(
        "gptq",
        _bits(stored, "gptq"),
        _group(stored),
        desc_act=bool(stored.get("desc_act", False)),
        sym=bool(stored.get("sym", True)),
        zero_offset=1 if fmt == "gptq" else 0,  # v1 stores each zero point minus one
        lm_head_packed=bool(stored.get("lm_head", False)),
    )


def _awq(stored: dict[str, Any]) -> QuantConfig:
    version = str(stored.get("version", "gemm")).lower()
    if version != "gemm":
        raise InputError(f"{FIELD}.version", f"unsupported {version!r}; allowed: gemm")
    if not stored.get("zero_point", True):
        raise InputError(f"{FIELD}.zero_point", "AWQ GEMM checkpoints without zero points are not supported")
    return QuantConfig(
        "awq",
        _bits(stored, "awq"),
        _group(stored),
        sym=False,
        skip=tuple(stored.get("modules_to_not_convert") or ()),
    )


def _compressed(stored: dict[str, Any]) -> QuantConfig:
    """llm-compressor's weight-only int (W4A16 / W8A16) in the pack-quantized format: one config group."""
    field = f"{FIELD}.config_groups"
    fmt = stored.get("format")
    if fmt != "pack-quantized":
        raise InputError(f"{FIELD}.format", f"unsupported {fmt!r}; allowed: pack-quantized (weight-only int)")
    groups = stored.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise InputError(field, "must hold exactly one group (one scheme for every quantized layer)")
    ((name, scheme),) = groups.items()
    weights = scheme.get("weights") if isinstance(scheme, dict) else None
    if not isinstance(weights, dict) or weights.get("type", "int") != "int":
        raise InputError(f"{field}.{name}.weights", "must describe int weights")
    if scheme.get("input_activations") is not None:
        raise InputError(f"{field}.{name}.input_activations", "quantized activations are not supported")
    strategy = weights.get("strategy", "group")
    if strategy not in ("group", "channel"):
        raise InputError(
            f"{field}.{name}.weights.strategy", f"unsupported {strategy!r}; allowed: group, channel"
        )
    group = _group(weights) if strategy == "group" else -1
    ignore = stored.get("ignore") or []
    return QuantConfig(
        "compressed-tensors",
        _bits(weights, "compressed-tensors", f"{field}.{name}.weights.num_bits"),
        group,
        desc_act=weights.get("actorder") not in (None, False),
        sym=bool(weights.get("symmetric", True)),
        skip=tuple(i.removeprefix("model.") for i in ignore if not i.startswith("re:") and i != "lm_head"),
        lm_head_packed="lm_head" not in ignore,  # llm-compressor quantizes every Linear it does not ignore
    )
