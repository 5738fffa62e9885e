"""Each family's config.json read both as the hub's checkpoints hold it and as transformers 5 saves it
(rope_parameters, nested per layer type for Gemma 3; attribute_map names), giving the same model config."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from transformers import AutoConfig

from meshserve.errors import InputError
from meshserve.models.loader import load_config

FAMILIES = ["llama3", "mistral", "qwen3", "gemma2", "gemma3", "phi3", "olmoe", "granitemoe"]


def saved_by_transformers(src, dst):
    """A copy of the model directory whose config.json transformers itself wrote."""
    shutil.copytree(src, dst)
    (dst / "config.json").unlink()
    AutoConfig.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.mark.parametrize("arch", FAMILIES)
def test_config_saved_by_transformers_reads_the_same(arch, tiny_model_dir, tmp_path):
    src = tiny_model_dir(arch)
    path = saved_by_transformers(src, tmp_path / arch)
    ours, _ = load_config(src)
    theirs, _ = load_config(path)
    fields = {f.name for f in dataclasses.fields(ours)} - {"name"}
    assert {f: getattr(theirs, f) for f in fields} == {f: getattr(ours, f) for f in fields}


def test_family_fields_are_read(tiny_model_dir):
    gemma2, _ = load_config(tiny_model_dir("gemma2"))
    assert (gemma2.norm_offset, gemma2.sandwich_norms, gemma2.hidden_act) == (1.0, True, "gelu_pytorch_tanh")
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (5.0, 10.0)
    assert gemma2.attention_scale == 24**-0.5 and gemma2.layer_windows == [8, None]
    gemma3, _ = load_config(tiny_model_dir("gemma3"))
    assert (gemma3.rope_theta, gemma3.local_rope_theta, gemma3.qk_norm) == (1e6, 1e4, True)
    assert gemma3.rope_scaling == {"rope_type": "linear", "factor": 8.0} and gemma3.layer_windows == [8, None]
    phi3, _ = load_config(tiny_model_dir("phi3"))
    assert phi3.rope_scaling["rope_type"] == "longrope" and phi3.partial_rotary_factor == 0.75
    assert phi3.rope_scaling["original_max_position_embeddings"] == 32
    olmoe, _ = load_config(tiny_model_dir("olmoe"))
    assert (olmoe.qk_norm, olmoe.qk_norm_per_head, olmoe.num_experts, olmoe.top_k) == (True, False, 4, 2)
    granite, _ = load_config(tiny_model_dir("granitemoe"))
    scales = (granite.embedding_scale, granite.residual_scale, granite.attention_scale, granite.logits_scale)
    assert scales == (12.0, 0.22, 0.015625, 6.0)
    mistral, _ = load_config(tiny_model_dir("mistral", sliding_window=6))
    assert mistral.layer_windows == [6, 6] and mistral.head_dim == 24


@pytest.mark.parametrize(
    ("arch", "edit", "field"),
    [
        ("gemma2", {"hidden_activation": "relu"}, "config.json:hidden_activation"),
        ("gemma2", {"attn_logit_softcapping": -1}, "config.json:attn_logit_softcapping"),
        ("phi3", {"partial_rotary_factor": 1.5}, "config.json:partial_rotary_factor"),
        ("phi3", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "config.json:rope_scaling"),
        ("olmoe", {"clip_qkv": "big"}, "config.json:clip_qkv"),
        ("granitemoe", {"residual_multiplier": 0}, "config.json:residual_multiplier"),
        ("gemma3", {"use_bidirectional_attention": True}, "config.json:use_bidirectional_attention"),
    ],
)
def test_bad_family_fields_name_the_field(arch, edit, field, tiny_model_dir, tmp_path):
    path = shutil.copytree(tiny_model_dir(arch), tmp_path / arch)
    config = json.loads((path / "config.json").read_text())
    config.update(edit)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as err:
        load_config(path)
    assert err.value.field == field
