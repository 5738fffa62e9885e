"""Bad model directories fail with an InputError that names the file or field, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
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
    expect_error(model_dir, "dtype", "allowed: float32, bfloat16", dtype="float16")


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
