"""make_tiny_model writes complete Hugging Face directories that transformers and meshserve both load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from meshserve.errors import InputError
from meshserve.models import load_model
from meshserve.testing import ARCHS, make_tiny_model

FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}


def stored_numel(model: torch.nn.Module) -> int:
    """Elements of the parameters and the persistent buffers (transformers keeps DeepSeek's router bias as a
    buffer, we as a parameter: loading fills parameters)."""
    params = {id(p) for p in model.parameters()}
    buffers = [t for t in model.state_dict(keep_vars=True).values() if id(t) not in params]
    return sum(p.numel() for p in model.parameters()) + sum(t.numel() for t in buffers)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_transformers_loads_every_architecture(arch, tmp_path):
    path = make_tiny_model(tmp_path / arch, arch=arch)
    assert FILES | {"model.safetensors"} <= {p.name for p in path.iterdir()}
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == ARCHS[arch]["model_type"]
    assert config["architectures"] == ARCHS[arch]["architectures"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ours = load_model(path)
    assert stored_numel(hf) == stored_numel(ours.model)
    assert AutoTokenizer.from_pretrained(path)("hi there").input_ids == ours.tokenizer.encode("hi there")


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    single = load_model(make_tiny_model(tmp_path / "one", arch="mixtral", seed=3))
    path = make_tiny_model(tmp_path / "three", arch="mixtral", seed=3, num_shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    sharded = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert hf.config.num_local_experts == 4
    expected = dict(single.model.named_parameters())
    for name, param in sharded.model.named_parameters():
        assert torch.equal(param, expected[name]), name


def test_overrides_seed_and_dtype(tmp_path):
    a = make_tiny_model(tmp_path / "a", seed=1, hidden_size=32, num_hidden_layers=1, vocab_size=300)
    b = make_tiny_model(tmp_path / "b", seed=1, hidden_size=32, num_hidden_layers=1, vocab_size=300)
    c = make_tiny_model(tmp_path / "c", seed=2, hidden_size=32, num_hidden_layers=1, vocab_size=300)
    data = {p.name: (p / "model.safetensors").read_bytes() for p in (a, b, c)}
    assert data["a"] == data["b"] != data["c"]
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    cfg = load_model(a).config
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == (32, 1, 300)
    bf16 = load_model(make_tiny_model(tmp_path / "bf16", dtype="bfloat16"), dtype="bfloat16")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16


def test_benchmark_sized_models_have_the_documented_shape(tmp_path):
    """The ~28M Llama of the throughput benchmark, and its Mixtral twin."""
    shape = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=1408, vocab_size=4096)  # fmt: skip
    llama = load_model(make_tiny_model(tmp_path / "llama", **shape))
    params = sum(p.numel() for p in llama.model.parameters())
    assert 25e6 < params < 30e6
    moe_shape = {**shape, "intermediate_size": 704, "num_hidden_layers": 2}  # 2 of 8 layers: faster
    moe = load_model(make_tiny_model(tmp_path / "moe", arch="mixtral", num_experts=8, **moe_shape))
    assert (moe.config.num_experts, moe.config.top_k, moe.config.num_moe_layers) == (8, 2, 2)
    assert moe.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 2 * 704, 512)


def test_bad_arguments_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="allowed: llama, qwen2, mixtral, qwen2_moe, qwen3_moe"):
        make_tiny_model(tmp_path, arch="gpt2")
    with pytest.raises(InputError, match="dtype"):
        make_tiny_model(tmp_path, dtype="int8")
