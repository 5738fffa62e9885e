"""Hardware and model presets load, and bad preset data names the bad field."""

import re

import pytest

from meshserve.errors import InputError
from meshserve.wafer.hardware import hardware_names, load_hardware
from meshserve.wafer.models import load_model, model_names
from meshserve.wafer.presets import PRESET_DIR


def test_bundled_presets_load():
    assert hardware_names() == ["dgx-b200", "nvl72", "wsc-4x8x8", "wsc-8x8"]
    assert [load_hardware(n).num_devices for n in hardware_names()] == [64, 72, 256, 64]
    wsc = load_hardware("wsc-8x8")
    assert wsc.die.peak_flops == 2250e12 and wsc.link_bandwidth == 900e9 and wsc.die.hbm_bandwidth == 8e12
    models = {n: load_model(n) for n in model_names()}
    assert set(models) == {"deepseek-v3", "deepseek-v2", "qwen3-235b-a22b", "dbrx", "mixtral-8x22b"}
    v3 = models["deepseek-v3"]
    assert (v3.routed_experts, v3.top_k, v3.hidden_size, v3.num_moe_layers) == (256, 8, 7168, 58)
    assert models["mixtral-8x22b"].top_k == 2 and models["dbrx"].routed_experts == 16


def test_unknown_preset_lists_the_allowed_names():
    with pytest.raises(InputError) as err:
        load_hardware("wsc-9x9")
    assert err.value.field == "hardware" and "wsc-8x8" in err.value.message
    with pytest.raises(InputError, match="model: unknown preset"):
        load_model("gpt-5")


BAD = {
    "negative bandwidth": (
        "link_bandwidth_gb_per_s: 900",
        "link_bandwidth_gb_per_s: -900",
        "bad.mesh.link_bandwidth_gb_per_s",
        "must be > 0",
    ),
    "text instead of a number": (
        "hop_latency_ns: 100",
        "hop_latency_ns: fast",
        "bad.mesh.hop_latency_ns",
        "must be a number",
    ),
    "missing rows": ("  rows: 8\n", "", "bad.mesh.rows", "integer"),
    "unknown kind": ("kind: mesh", "kind: torus", "bad.kind", "allowed: mesh, switch"),
    "zero injection port": (
        "hbm_bandwidth_tb_per_s: 8",
        "hbm_bandwidth_tb_per_s: 8\n  injection_bandwidth_gb_per_s: 0",
        "bad.die.injection_bandwidth_gb_per_s",
        "must be > 0",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_hardware_preset_names_the_field(case, tmp_path):
    old, new, field, message = BAD[case]
    source = (PRESET_DIR / "hardware" / "wsc-8x8.yaml").read_text().replace("name: wsc-8x8", "name: bad")
    path = tmp_path / "bad.yaml"
    path.write_text(source.replace(old, new))
    with pytest.raises(InputError) as err:
        load_hardware(str(path))
    assert err.value.field == field and message in err.value.message


def test_injection_port_is_an_optional_die_field(tmp_path):
    assert load_hardware("wsc-8x8").die.injection_bandwidth == 0.0  # default: what the links sum to
    source = (PRESET_DIR / "hardware" / "wsc-8x8.yaml").read_text()
    path = tmp_path / "ported.yaml"
    port = "hbm_bandwidth_tb_per_s: 8\n  injection_bandwidth_gb_per_s: 900"
    path.write_text(source.replace("hbm_bandwidth_tb_per_s: 8", port))
    assert load_hardware(str(path)).die.injection_bandwidth == 900e9


def test_mla_without_a_query_latent_counts_a_plain_q_proj(tmp_path):
    """q_lora_rank 0 is DeepSeek's null (DeepSeek-V2-Lite, the shipped tiny-moe): one h x heads*(nope+rope)
    query GEMM instead of the two low-rank ones."""
    text = (PRESET_DIR / "models" / "deepseek-v2.yaml").read_text()
    lite = tmp_path / "lite.yaml"
    lite.write_text(re.sub(r"q_lora_rank: \d+", "q_lora_rank: 0", text))
    full, model = load_model("deepseek-v2"), load_model(str(lite))
    a, h = full.attention, full.hidden_size
    qk = a.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)
    assert model.attention.q_lora_rank == 0
    assert model.attention_params - full.attention_params == h * qk - (h * a.q_lora_rank + a.q_lora_rank * qk)
