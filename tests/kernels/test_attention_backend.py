"""Which attention a forward runs: native on CPU, the reference on CUDA (the Triton kernel is opt-in until a
GPU run verifies it), either when forced; CPU inference never imports the Triton kernel."""

from __future__ import annotations

import subprocess
import sys

import torch

from meshserve import switches
from meshserve.engine.device import resolve_device
from meshserve.kernels.attention import TritonPlan, attention_backend, plan_step
from tests.kernels.test_meta_attention import build_batch


def test_backend_by_device_and_by_environment(native_op, switch):
    cpu = torch.device("cpu")
    assert attention_backend(cpu, torch.float32) == "native"
    assert attention_backend(cpu, torch.float16) == "reference"  # the native op serves float32 / bfloat16
    switch("MESHSERVE_ATTENTION", "reference")
    assert attention_backend(cpu, torch.float32) == "reference"


def test_cuda_runs_the_reference_unless_triton_is_opted_in(monkeypatch, switch):
    """A GPU with triton installed still gets the torch reference: the Triton kernel has not run on a GPU
    (README: GPU paths). MESHSERVE_ATTENTION=triton, or the same engine argument, opts in."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())  # triton "installed"
    gpu = resolve_device("cuda", local_rank=1)
    assert gpu == torch.device("cuda", 1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert attention_backend(gpu, dtype) == "reference"
    switch("MESHSERVE_ATTENTION", "triton")
    assert attention_backend(gpu, torch.bfloat16) == "triton"
    switch("MESHSERVE_ATTENTION", None)
    switches.use(switches.read({"MESHSERVE_ATTENTION": "triton"}))  # what an engine given the argument does
    assert attention_backend(gpu, torch.bfloat16) == "triton"


def test_triton_plans_never_split_a_task():
    """One Triton program owns a task's rows, so even a 3,000-position decode is one task per KV head."""
    meta, _ = build_batch(context=[3000, 40, 0], q_lens=[1, 5, 130], block_size=16, seed=0)
    plans = plan_step(meta, 16, 8, 2, 64, torch.bfloat16, {None, 32}, backend="triton")
    for plan in plans.values():
        assert isinstance(plan, TritonPlan)
        assert plan.table.partial_rows == 0 and len(plan.table.combine) == 0
        assert len(plan.table.tasks) == 2 * (1 + 1 + 3)  # KV heads x (decode, short block, 130 rows / 64)


def test_cpu_inference_never_imports_the_triton_kernel(tiny_model_dir):
    """(torch._dynamo imports triton itself where it is installed; meshserve's CPU path never does.)"""
    script = (
        "import sys\n"
        "from meshserve.models import load_model\n"
        "from meshserve.testing import PagedSequences\n"
        f"seqs = PagedSequences(load_model({str(tiny_model_dir('llama'))!r}))\n"
        "a = seqs.add([1, 5, 6])\n"
        "seqs.step({a: 3})\n"
        "assert 'meshserve.kernels.triton_attention' not in sys.modules, 'took the Triton path'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
