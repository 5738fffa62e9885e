"""Rotary frequencies equal transformers' for every rope_scaling type our configs use."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from meshserve.errors import InputError
from meshserve.kernels.fused import rotary_reference as apply_rotary
from meshserve.models.layers.rotary import rope_frequencies

SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512, "beta_fast": 16,
     "beta_slow": 2},
]  # fmt: skip


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"])
def test_frequencies_match_transformers(scaling):
    hf = LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=1024,
                     rope_parameters={"rope_theta": 5e5, **scaling})  # fmt: skip
    expected, expected_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
    inv_freq, scale = rope_frequencies(64, 5e5, scaling, 1024)
    torch.testing.assert_close(inv_freq, expected.float())
    assert scale == pytest.approx(expected_scale)


def test_rotation_keeps_norms_and_position_zero_is_identity():
    x = torch.randn(3, 2, 8)
    inv_freq, _ = rope_frequencies(8, 10000.0, None, 64)
    freqs = torch.tensor([0.0, 5.0, 17.0])[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    y = apply_rotary(x, emb.cos(), emb.sin())
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[0], x[0])


def test_unknown_rope_type_is_an_input_error():
    with pytest.raises(InputError, match="rope_type 'mrope'.*allowed: default"):
        rope_frequencies(8, 10000.0, {"rope_type": "mrope"}, 64)
    with pytest.raises(InputError, match="needs field 'short_factor'"):
        rope_frequencies(8, 10000.0, {"rope_type": "longrope", "original_max_position_embeddings": 4}, 64)
    with pytest.raises(InputError, match="need 4 numbers each"):
        scaling = {"rope_type": "longrope", "original_max_position_embeddings": 4, "short_factor": [1.0]}
        rope_frequencies(8, 10000.0, scaling | {"long_factor": [1.0]}, 64)
    with pytest.raises(InputError, match="needs field 'factor'"):
        rope_frequencies(8, 10000.0, {"rope_type": "linear"}, 64)
