"""Mixed vs disaggregated prefill/decode on the wafer: KV bytes, its moves over the mesh, the split."""

import json
import re

import numpy as np
import pytest
import yaml

from meshserve.errors import InputError
from meshserve.testing import run_cli
from meshserve.wafer import pd
from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.mapping import make_mapping
from meshserve.wafer.models import load_model
from meshserve.wafer.pd import (
    Mix,
    deployment,
    kv_bytes_per_request,
    kv_member_bytes,
    kv_transfer_s,
    pd_settings,
)
from meshserve.wafer.presets import PRESET_DIR
from meshserve.wafer.report import run_layer
from meshserve.wafer.simulate import simulate_layer, step_s
from meshserve.wafer.split import splits
from meshserve.wafer.topology import topology_for

WSC = load_hardware("wsc-8x8")
NVL = load_hardware("nvl72")
V3 = load_model("deepseek-v3")
MIXTRAL = load_model("mixtral-8x22b")


def test_kv_bytes_per_request_from_the_preset_by_hand():
    # Mixtral 8x22B: 56 layers x (K and V) x 8 KV heads x 128 head dim x 2 bytes, per prompt token
    assert kv_bytes_per_request(MIXTRAL, 1000) == 56 * 2 * 8 * 128 * 2 * 1000
    assert kv_member_bytes(MIXTRAL, 1000, tp=4) == 56 * 2 * 8 * 128 * 2 * 1000 / 4  # heads split over TP
    # DeepSeek-V3's MLA: 61 layers x (512 latent + 64 rope key) x 2 bytes; every TP member holds it all
    assert kv_bytes_per_request(V3, 1000) == 61 * (512 + 64) * 2 * 1000
    assert kv_member_bytes(V3, 1000, tp=4) == kv_bytes_per_request(V3, 1000)


def test_transfer_time_grows_with_hop_distance():
    topo = topology_for(WSC)
    far = np.array([1, 2, 3, 7, 15, 23, 63])  # along row 0, then down column 7
    t = kv_transfer_s(topo, np.zeros(7, dtype=int), far, 1e8)
    assert (np.diff(t) > 0).all()
    # an idle mesh: one link's bandwidth plus each hop's latency
    expected = 1e8 / WSC.link_bandwidth + topo.hops[0, far] * WSC.hop_latency
    assert t == pytest.approx(expected)
    # a link at half its bandwidth (another stream holds the rest) halves a flow through it
    free = topo.link_bandwidth.copy()
    free[topo.incidence[0 * 64 + 1].indices] /= 2
    assert kv_transfer_s(topo, [0], [1], 1e8, free)[0] == pytest.approx(
        2e8 / WSC.link_bandwidth + WSC.hop_latency
    )


@pytest.mark.parametrize("dies", [0, 64, 12, -8])
def test_disagg_refuses_a_split_with_no_prefill_or_decode_dies_or_part_rows(dies):
    with pytest.raises(InputError) as err:
        deployment(WSC, V3, Mix(2048, 512), deploy="disagg", prefill_dies=dies)
    assert err.value.field == "prefill_dies"
    assert (
        "allowed on wsc-8x8: 8, 16, 24, 32, 40, 48, 56" in err.value.message
        and f"got {dies}" in err.value.message
    )


def test_bad_mixes_and_deploys_name_their_field():
    with pytest.raises(InputError, match="prompt_tokens"):
        Mix(0, 512)
    with pytest.raises(InputError, match="output_tokens"):
        Mix(2048, 1.5)
    with pytest.raises(InputError, match="deploy"):
        deployment(WSC, V3, Mix(2048, 512), deploy="split")
    with pytest.raises(InputError, match="prefill_dies"):
        deployment(WSC, V3, Mix(2048, 512), deploy="mixed", prefill_dies=8)
    with pytest.raises(InputError, match="hardware"):
        splits(load_hardware("wsc-4x8x8"), 4)


def test_mixed_decode_step_is_todays_simulate():
    mix = Mix(2048, 512)
    point = deployment(WSC, V3, mix, tp=4, mapping="er", tokens_per_device=64)
    hw, mo, m, tokens, layer = run_layer(
        "wsc-8x8", "deepseek-v3", 4, "er", 64, None, mix.context, "bottleneck"
    )
    assert point.decode_only_step_s == step_s(hw, mo, m, layer, tokens, mix.context)
    shown = run_cli(["wafer", "simulate", "--context", str(mix.context)])  # the defaults: wsc-8x8, V3, er, 64
    ms = re.search(r"decode\s+step\s+over\s+61\s+layers:\s+([\d.]+)\s+ms", shown.out)  # rich wraps lines
    assert ms and float(ms.group(1)) == round(point.decode_only_step_s * 1e3, 2), shown.out
    # the prompts' share of each step is what mixing costs decode
    assert point.tpot_s > point.decode_only_step_s
    assert point.output_tokens_per_s_per_die == pytest.approx(64 / point.tpot_s)


@pytest.mark.parametrize("hw", [WSC, NVL], ids=lambda h: h.name)
def test_disagg_moves_kv_over_links_the_collectives_share(hw):
    mix = Mix(4096, 256)
    point = deployment(hw, V3, mix, deploy="disagg", prefill_dies=splits(hw, 4)[3])
    assert point.kv_wire_bytes_per_request == 4 * kv_bytes_per_request(V3, 4096)  # MLA: a copy per member
    assert 0 < point.kv_link_utilization <= point.link_utilization <= 0.69  # pd.yaml's link ceiling
    # under load a move takes longer than on idle links, and the worst pair no less than the mean
    alone = kv_member_bytes(V3, 4096, 4) / hw.link_bandwidth
    assert (
        alone < point.kv_transfer_s <= point.kv_transfer_worst_s * (1 + 1e-12)
    )  # a mean of equal pairs may round up
    assert point.requests_per_s == pytest.approx(point.output_tokens_per_s_per_die * hw.num_devices / 256)
    # decode no longer waits for prompts: its step is shorter than the mixed one at the same batch
    assert point.tpot_s < deployment(hw, V3, mix).tpot_s


def test_disagg_picks_the_split_with_the_most_throughput():
    mix = Mix(1024, 1024)
    best = deployment(WSC, V3, mix, deploy="disagg")
    every = [deployment(WSC, V3, mix, deploy="disagg", prefill_dies=d) for d in splits(WSC, 4)]
    fitting = [p for p in every if p.fits]
    assert best.output_tokens_per_s_per_die == max(p.output_tokens_per_s_per_die for p in fitting)
    # a prompt-heavier mix wants more prefill dies
    assert deployment(WSC, V3, Mix(4096, 256), deploy="disagg").prefill_dies > best.prefill_dies


def test_a_prompt_step_attends_causally_and_is_refused_past_its_tokens():
    m = make_mapping(WSC, 4, "er")
    decode = simulate_layer(WSC, V3, m, 512, context=2048)
    prompt = simulate_layer(WSC, V3, m, 512, context=2048, prefill_tokens_per_device=512, prompt=2048)
    # the same tokens, but each attends to (2048 + 1) / 2 tokens, not 2048: less attention, same comm
    assert prompt.phase("attention").time_s < decode.phase("attention").time_s
    assert prompt.comm_s == decode.comm_s
    with pytest.raises(InputError, match="prefill_tokens_per_device"):
        simulate_layer(WSC, V3, m, 64, prefill_tokens_per_device=65, prompt=100)
    with pytest.raises(InputError, match="prompt"):
        simulate_layer(WSC, V3, m, 64, prefill_tokens_per_device=64)


def test_pd_command_writes_the_sweep_figure_and_json(tmp_path):
    out = tmp_path / "figs" / "pd.png"
    result = run_cli(
        ["wafer", "pd", "--prompt-tokens", "4096", "--output-tokens", "256", "--json", "--plot", str(out)]
    )
    assert result.code == 0, result.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["pd.png"]  # written atomically: no temp file left
    data = json.loads(result.out)
    assert [p["deploy"] for p in data["points"]] == ["mixed", "disagg"]
    mixes = pd_settings().mixes
    assert len(data["sweep"]) == 2 * 2 * len(mixes)  # wsc-8x8 and nvl72, mixed and disagg, every mix
    assert {p["hardware"] for p in data["sweep"]} == {"wsc-8x8", "nvl72"}


def test_a_tpot_limit_decodes_the_largest_batch_that_meets_it():
    mix = Mix(2048, 512)
    point = deployment(WSC, V3, mix, tpot_slo_s=0.02, tokens_per_device=256)
    assert point.meets_slo and point.tpot_s <= 0.02 and 1 < point.tokens_per_device < 256
    assert deployment(WSC, V3, mix, tokens_per_device=point.tokens_per_device * 1.01).tpot_s > 0.02
    # a limit no batch meets: the smallest batch, marked
    tight = deployment(WSC, V3, mix, deploy="disagg", prefill_dies=40, tpot_slo_s=1e-4)
    assert not tight.meets_slo and tight.tokens_per_device == 1 and tight.summary()["meets_slo"] is False


def test_pd_command_names_a_bad_flag():
    result = run_cli(["wafer", "pd", "--deploy", "disagg", "--prefill-dies", "0"])
    assert result.code == 2 and result.err.startswith("error: prefill_dies: "), result.err
    result = run_cli(["wafer", "pd", "--plot", "pd.jpg"])
    assert result.code == 2 and result.err.startswith("error: plot: "), result.err
    result = run_cli(["wafer", "pd", "--tpot-slo-ms", "0"])
    assert result.code == 2 and result.err.startswith("error: tpot_slo_ms: "), result.err


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"link_ceiling": 1.0}, "pd.link_ceiling"),
        ({"mixes": [[2048]]}, "pd.mixes"),
        ({"mixes": [[0, 512]]}, "prompt_tokens"),
        ({"prefil_tokens_per_device": 2048}, "pd.prefil_tokens_per_device"),
        ({"compare_on": "nvl72"}, "pd.compare_on"),
    ],
)
def test_a_bad_pd_preset_names_its_field(tmp_path, monkeypatch, change, field):
    data = yaml.safe_load((PRESET_DIR / "pd.yaml").read_text()) | change
    (tmp_path / "pd.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setattr(pd, "PD_PATH", tmp_path / "pd.yaml")
    pd.pd_settings.cache_clear()
    try:
        with pytest.raises(InputError) as err:
            pd.pd_settings()
        assert err.value.field == field
    finally:
        pd.pd_settings.cache_clear()
