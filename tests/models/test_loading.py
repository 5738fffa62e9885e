"""Loading as checkpoints are saved: the checkpoint's dtype, a peak near the weights' bytes, one resident copy
of every expert, and a fit check that counts what serving will hold before anything is allocated."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from meshserve.engine import LLM, Engine, SamplingParams
from meshserve.engine import engine as engine_module
from meshserve.errors import InputError
from meshserve.models import load_model
from meshserve.models.layers.moe import StackedExperts
from meshserve.models.weights import Checkpoint
from meshserve.testing import make_tiny_model


def test_dtype_auto_is_the_checkpoints_own(tiny_model_dir, tmp_path):
    assert load_model(tiny_model_dir("llama")).config.dtype == torch.float32
    path = make_tiny_model(tmp_path / "bf16", arch="llama", dtype="bfloat16")
    loaded = load_model(path)
    assert loaded.config.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model.rotary.inv_freq.dtype == torch.float32  # frequencies stay float32, as in transformers
    config = json.loads((path / "config.json").read_text())
    del config["torch_dtype"]
    (path / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))  # transformers 5's name
    assert load_model(path).config.dtype == torch.float16


def test_float16_generates_transformers_greedy_tokens(tiny_model_dir):
    """float16 runs on CPU through the torch kernels (the native ones are float32 / bfloat16)."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("llama")
    prompt = [1, 5, 9, 30, 40]
    llm = LLM(str(path), dtype="float16", max_num_seqs=1)
    (out,) = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False
    )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
    ids = hf.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert out.token_ids == ids[0, len(prompt) :].tolist()


PEAK_SCRIPT = """
import gc, json, sys
from pathlib import Path
from meshserve.models import load_model, weights

weights.CHUNK_BYTES = 1 << 20  # small chunks: the file pages resident at once stay small beside the model

def rss(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

load_model(sys.argv[2])  # a tiny model first: lazy imports and torch's first-use setup are not the load's
gc.collect()
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
base = rss("VmRSS")
model = load_model(sys.argv[1]).model
print(json.dumps({"grew": rss("VmHWM") - base, "nbytes": weights.Checkpoint(Path(sys.argv[1])).nbytes}))
"""


def test_the_loaders_peak_stays_near_the_weights_bytes(tmp_path, tiny_model_dir):
    """A bfloat16 checkpoint of ~28 MB loads with a peak of at most 1.1x its bytes (plus 8 MiB of slack for
    the allocator and one chunk); building in float32 and casting, as before, takes 3x."""
    path = make_tiny_model(
        tmp_path / "m",
        arch="llama",
        dtype="bfloat16",
        num_shards=2,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        vocab_size=16384,
    )
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PEAK_SCRIPT), str(path), str(tiny_model_dir("llama"))],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(run.stdout.splitlines()[-1])
    assert r["nbytes"] > 25 << 20
    assert r["grew"] <= 1.1 * r["nbytes"] + (8 << 20), r


def test_a_moe_engine_keeps_one_copy_of_its_experts(tiny_model_dir):
    """The fused MoE op's packed copy is the only one: the stacked weights are dropped (meta, shapes only),
    and every tensor the model holds adds up to the checkpoint's bytes plus the packing's padding."""
    path = tiny_model_dir("mixtral")
    llm = LLM(str(path), max_num_seqs=2)
    model = llm.engine.model
    experts = [m for m in model.modules() if isinstance(m, StackedExperts)]
    assert experts and all(m.packed is not None for m in experts)
    assert all(m.gate_up_proj.is_meta and m.down_proj.is_meta for m in experts)
    held = sum(p.nbytes for p in model.parameters() if not p.is_meta)
    held += sum(p.nbytes for m in experts for p in m.packed)
    assert held <= 1.1 * Checkpoint(path).nbytes
    (out,) = llm.generate([[1, 5, 9, 30]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert out.token_ids  # served from the packed copy alone


def test_the_fit_check_counts_kernel_copies_and_the_draft_before_allocating(tmp_path, monkeypatch):
    path = make_tiny_model(tmp_path / "bf16", arch="llama", dtype="bfloat16")
    tables = {}
    for kernel in ("packed_f32", "linear"):  # packed_f32: a float32 copy of each bfloat16 linear weight
        tables[kernel] = tmp_path / f"{kernel}.json"
        tables[kernel].write_text(json.dumps({"version": 1, "gemm": {"bfloat16": {"*": [[1, kernel, 1]]}}}))
    weights = Checkpoint(path).nbytes
    monkeypatch.setattr(engine_module, "free_memory", lambda device: int(1.5 * weights))
    monkeypatch.setattr(engine_module, "build_model", lambda *a: pytest.fail("allocated before checking"))
    with pytest.raises(InputError, match=r"iB of weights, .* MiB of kernel copies\), more than the") as err:
        Engine.from_args(str(path), kernel_profile=str(tables["packed_f32"]), kernel_memory_budget=1 << 30)
    assert err.value.field == "model"
    spec = {"method": "draft_model", "model": str(path), "num_speculative_tokens": 2}
    with pytest.raises(InputError, match=r"MiB of weights, .* MiB of draft\)"):
        Engine.from_args(str(path), speculative_config=spec, kernel_profile=str(tables["linear"]))
