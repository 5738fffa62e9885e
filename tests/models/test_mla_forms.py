"""Which MLA form a step takes: the one this machine's measured FormCosts predict faster
(kernels/profiles/mla.json; the multiply-add count where no profile matches)."""

from __future__ import annotations

import json

import numpy as np
import torch

from meshserve.engine.runner import batch_metadata
from meshserve.kernels.attention_tiles import profile_key
from meshserve.models.layers.mla import FormCosts, MLAConfig, expanded_prefill, form_costs

V2_LITE = MLAConfig(None, 512, 128, 64, 128, True, 192**-0.5)  # DeepSeek-V2-Lite's MLA


def step(cached: int, rows: int, seqs: int = 1):
    ones = np.ones(seqs, dtype=np.int64)
    tables = np.arange(seqs * 256).reshape(seqs, 256).tolist()
    return batch_metadata(np.full(seqs, cached), np.full(seqs, rows), ones, tables, 16)


def test_measured_costs_decide_the_form():
    prompt, decodes = step(0, 512), step(2048, 1, seqs=8)
    assert expanded_prefill(prompt, V2_LITE) and not expanded_prefill(decodes, V2_LITE)  # multiply-adds
    # e.g. absorbed W_UK / W_UV products slow on short chunks, expanded scores materialised (unlike the op's)
    measured = FormCosts(absorbed_rows=2.0, expanded_pairs=6.0)
    assert not expanded_prefill(prompt, V2_LITE, measured)
    assert expanded_prefill(step(0, 16), V2_LITE, measured)  # short prompts: the rows' terms dominate


def test_form_costs_read_this_machines_profile_first(tmp_path, switch):
    key = profile_key(576, torch.bfloat16)
    (tmp_path / "mla.json").write_text(
        json.dumps({"entries": {key: {"expanded_pairs": 3.5, "measured": []}}})
    )
    switch("MESHSERVE_PROFILE_DIR", str(tmp_path))
    form_costs.cache_clear()
    try:
        assert form_costs(576, torch.bfloat16) == FormCosts(expanded_pairs=3.5)
        assert form_costs(64, torch.bfloat16) == FormCosts()  # no entry for that width: the count
    finally:
        form_costs.cache_clear()


def test_shipped_fits_pick_the_form_measured_faster():
    """Every shipped entry, at each timing it was fitted to where one form was over 10% faster, picks
    that form (DeepSeek-V2/V3's MLA widths; the timings' head count)."""
    from meshserve.models.layers.mla import SHIPPED_PROFILE

    v3_mla = MLAConfig(None, 512, 128, 64, 128, True, 1.0)
    for key, entry in json.loads(SHIPPED_PROFILE.read_text())["entries"].items():
        costs = FormCosts(**{k: v for k, v in entry.items() if k != "measured"})
        for m in entry["measured"]:
            absorbed, expanded = m["ms"]
            if max(absorbed, expanded) > 1.1 * min(absorbed, expanded):
                picks = expanded_prefill(step(m["cached"], m["rows"], m["seqs"]), v3_mla, costs)
                assert picks == (expanded < absorbed), (key, m)
