"""quantization= against the checkpoint's quantization_config: what loads, and errors that name a field."""

from __future__ import annotations

import pytest

from meshserve.errors import InputError
from meshserve.models.quant.config import head_config, resolve_quantization

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": False}


def test_auto_reads_the_checkpoint():
    qc = resolve_quantization(None, {"quantization_config": GPTQ})
    assert (qc.method, qc.bits, qc.group_size, qc.desc_act, qc.sym, qc.zero_offset) == (
        "gptq",
        4,
        128,
        True,
        False,
        1,
    )
    assert resolve_quantization(None, {}) is None
    v2 = resolve_quantization("gptq", {"quantization_config": GPTQ | {"checkpoint_format": "gptq_v2"}})
    assert v2.zero_offset == 0
    awq = {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "GEMM", "zero_point": True}
    assert resolve_quantization(None, {"quantization_config": awq}).group_size == 64


CT = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "strategy": "group", "group_size": 128, "symmetric": True},
        }
    },
    "ignore": ["lm_head", "model.layers.0.mlp.down_proj"],
}


def test_compressed_tensors_scheme():
    qc = resolve_quantization("compressed-tensors", {"quantization_config": CT})
    assert (qc.bits, qc.group_size, qc.sym, qc.skip) == (4, 128, True, ("layers.0.mlp.down_proj",))


def test_at_load_methods():
    assert (resolve_quantization("int8", {}).bits, resolve_quantization("int4", {}).group_size) == (8, 128)


def test_lm_head_defaults_per_format_and_the_knob():
    gptq = {"quantization_config": GPTQ}
    assert resolve_quantization("int8", {}).lm_head  # at load: the head too
    assert not resolve_quantization("int4", {}, quantize_lm_head=False).lm_head
    assert not resolve_quantization(None, gptq).lm_head  # GPTQ: as the checkpoint stores it
    stored = resolve_quantization(None, {"quantization_config": GPTQ | {"lm_head": True}})
    assert stored.lm_head and stored.lm_head_packed and head_config(stored) == stored
    # a float head quantized at load from a packed checkpoint: round-to-nearest with its bits
    opted = resolve_quantization(None, gptq, quantize_lm_head=True)
    assert opted.lm_head and (head_config(opted).method, head_config(opted).group_size) == ("int4", 128)
    assert resolve_quantization("compressed-tensors", {"quantization_config": CT}).lm_head is False


@pytest.mark.parametrize(
    ("requested", "stored", "knob", "message"),
    [
        (None, GPTQ | {"lm_head": True}, False, "stores lm_head quantized"),
        (None, None, True, "needs quantization"),
    ],
)
def test_lm_head_knob_errors_name_it(requested, stored, knob, message):
    hf = {} if stored is None else {"quantization_config": stored}
    with pytest.raises(InputError, match=f"quantize_lm_head: .*{message}"):
        resolve_quantization(requested, hf, quantize_lm_head=knob)


@pytest.mark.parametrize(
    ("requested", "stored", "field", "message"),
    [
        (None, GPTQ | {"bits": 3}, "quantization_config.bits", "3 bits is not supported; allowed: (4, 8)"),
        (None, {"quant_method": "awq", "bits": 8}, "quantization_config.bits", "allowed: (4,)"),
        (None, {"quant_method": "awq", "version": "gemv"}, "quantization_config.version", "allowed: gemm"),
        (None, GPTQ | {"group_size": 0}, "quantization_config.group_size", "or -1"),
        (None, {"quant_method": "bitsandbytes"}, "quant_method", "supported checkpoints: gptq, awq"),
        (None, CT | {"format": "float-quantized"}, "quantization_config.format", "allowed: pack-quantized"),
        (None, CT | {"config_groups": {}}, "quantization_config.config_groups", "exactly one group"),
        ("fp8", None, "quantization", "allowed: gptq, awq, compressed-tensors, int8, int4"),
        ("int8", GPTQ, "quantization", "this one is gptq"),
        ("awq", GPTQ, "quantization", "the checkpoint is 'gptq'"),
        ("gptq", None, "quantization", "needs a checkpoint with a quantization_config"),
    ],
)
def test_errors_name_the_field(requested, stored, field, message):
    hf = {} if stored is None else {"quantization_config": stored}
    with pytest.raises(InputError) as err:
        resolve_quantization(requested, hf)
    assert field in err.value.field and message in err.value.message
