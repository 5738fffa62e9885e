"""Bad model directories fail with an InputError that names the file or field, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from meshserve.errors import InputError
from meshserve.models import load_model


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path):
    """A private copy of a tiny Llama to break."""
    return shutil.copytree(tiny_model_dir("llama"), tmp_path / "model")


def edit_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


def expect_error(path, field, match, dtype="float32"):
    with pytest.raises(InputError, match=match) as err:
        load_model(path, dtype=dtype)
    assert err.value.field == field


def test_missing_directory(tmp_path):
    expect_error(tmp_path / "nope", "model", "is not a directory")


def test_missing_or_corrupt_config(model_dir):
    (model_dir / "config.json").write_text("{not json")
    expect_error(model_dir, "config.json", "invalid JSON")
    (model_dir / "config.json").unlink()
    expect_error(model_dir, "config.json", "missing")


def test_unsupported_architecture_lists_supported(model_dir):
    edit_config(model_dir, architectures=["GPT2LMHeadModel"])
    expect_error(model_dir, "config.json:architectures", "supported: LlamaForCausalLM, Qwen2ForCausalLM")


def test_bad_config_field(model_dir):
    edit_config(model_dir, hidden_size="wide")
    expect_error(model_dir, "config.json:hidden_size", "expected int")
    edit_config(model_dir, hidden_size=64, num_key_value_heads=3)
    expect_error(model_dir, "config.json:num_key_value_heads", "must divide num_attention_heads=4")


def test_unsupported_dtype(model_dir):
    expect_error(model_dir, "dtype", "allowed: auto, float32, bfloat16, float16", dtype="float64")
    edit_config(model_dir, torch_dtype="int8")  # "auto" reads the checkpoint's, checked too
    expect_error(model_dir, "config.json:torch_dtype", "unsupported 'int8'", dtype="auto")


def test_missing_corrupt_or_incomplete_weights(model_dir):
    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, weights)
    expect_error(model_dir, "weights", "missing tensors: model.layers.1.self_attn.k_proj.weight$")
    weights.write_bytes(b"\x00\x01garbage")
    expect_error(model_dir, "model.safetensors", "corrupt safetensors")
    weights.unlink()
    expect_error(model_dir, "weights", "no \\*.safetensors file")


def test_wrong_tensor_shape(model_dir):
    edit_config(model_dir, intermediate_size=96)
    expect_error(model_dir, "weights", "shape")


def test_sharded_index_naming_a_missing_shard(tiny_model_dir, tmp_path):
    path = shutil.copytree(tiny_model_dir("llama", num_shards=3), tmp_path / "sharded")
    (path / "model-00002-of-00003.safetensors").unlink()
    expect_error(path, "model-00002-of-00003.safetensors", "listed in model.safetensors.index.json")
    (path / "model.safetensors.index.json").write_text("[]")
    expect_error(path, "model.safetensors.index.json", "not a valid safetensors index")


def test_missing_or_corrupt_tokenizer(model_dir):
    (model_dir / "tokenizer.json").write_text("{}")
    expect_error(model_dir, "tokenizer.json", "cannot parse")
    (model_dir / "tokenizer.json").unlink()
    expect_error(model_dir, "tokenizer.json", "missing")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("head_dim", -16, "positive integer"),
        ("head_dim", 16.0, "expected int"),
        ("rope_theta", -10000.0, "finite number > 0"),
        ("rope_theta", 0, "finite number > 0"),
        ("rope_theta", float("inf"), "finite number > 0"),
        ("rms_norm_eps", float("nan"), "finite number > 0"),
        ("rms_norm_eps", "1e-6", "finite number > 0"),
        ("tie_word_embeddings", "false", "true or false"),
        ("attention_bias", "no", "true or false"),
        ("eos_token_id", 10**6, "token ids in"),
        ("eos_token_id", [2, -1], "token ids in"),
    ],
)
def test_config_values_that_parse_but_make_no_sense(model_dir, field, value, match):
    edit_config(model_dir, **{field: value})
    expect_error(model_dir, f"config.json:{field}", match)


def test_rope_parameters_of_transformers_v5_are_checked_too(model_dir):
    edit_config(model_dir, rope_parameters={"rope_theta": "big", "rope_type": "default"})
    expect_error(model_dir, "config.json:rope_parameters:rope_theta", "finite number > 0")


@pytest.mark.parametrize(
    ("dtype", "poison"),
    [
        (torch.int8, None),
        (torch.float64, None),
        (torch.float32, float("nan")),
        (torch.bfloat16, float("inf")),
    ],
)
def test_weights_of_an_unsupported_dtype_or_holding_nan_are_refused(model_dir, dtype, poison):
    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name].to(dtype)
    if poison is not None:
        tensors[name][3, 5] = poison
    save_file(tensors, weights)
    expect_error(model_dir, f"model.safetensors:{name}", "NaN or infinite" if poison else "not supported")


@pytest.mark.parametrize(
    "weight_map", [[], {}, {"a.weight": 3}, {"a.weight": "../model.safetensors"}, {"a.weight": "weights.bin"}]
)
def test_a_weight_map_of_the_wrong_shape_is_refused(tiny_model_dir, tmp_path, weight_map):
    path = shutil.copytree(tiny_model_dir("llama", num_shards=2), tmp_path / "sharded")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    expect_error(path, "model.safetensors.index.json:weight_map", "file names")


def test_a_tokenizer_config_without_usable_special_tokens_is_refused(model_dir):
    edit_config(model_dir, eos_token_id=None, bos_token_id=None)
    (model_dir / "generation_config.json").unlink()
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|end|>"}))
    expect_error(model_dir, "tokenizer_config.json:eos_token", "not a token of tokenizer.json")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": {"id": 2}}))
    expect_error(model_dir, "tokenizer_config.json:eos_token", "expected a string")
    del config["eos_token"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    expect_error(model_dir, "config.json:eos_token_id", "no end-of-sequence token")


def test_a_config_describing_a_model_larger_than_the_machine_is_refused_before_allocating(model_dir):
    edit_config(model_dir, hidden_size=1 << 16, intermediate_size=1 << 20, num_hidden_layers=64)
    expect_error(model_dir, "config.json", "GiB of weights\\), more than the .* available")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "hot"),
        ("temperature", -1),
        ("top_p", 0),
        ("top_k", 1 << 70),
        ("repetition_penalty", 0),
        ("max_new_tokens", 0),
        ("min_p", True),
    ],
)
def test_generation_config_defaults_are_checked_at_load_naming_file_and_field(model_dir, field, value):
    """The model's own defaults are its fault: refused when it loads, never on a request that omits them."""
    path = model_dir / "generation_config.json"
    generation = json.loads(path.read_text())
    path.write_text(json.dumps({**generation, field: value}))
    expect_error(model_dir, f"generation_config.json:{field}", "must be")
