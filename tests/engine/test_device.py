"""device="cpu" | "cuda": the torch device and the torch.distributed backend it picks, and clear errors
where CUDA is missing. The CUDA runs themselves skip on machines without a GPU (two GPUs for NCCL)."""

from __future__ import annotations

import pytest
import torch

from meshserve.config import EngineConfig
from meshserve.engine import LLM, SamplingParams
from meshserve.engine.device import free_memory, process_group_backend, resolve_device
from meshserve.errors import InputError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1, 40, 41, 42], [1] + list(range(50, 70)), [1, 7]]
ARGS = {"max_num_batched_tokens": 16, "max_num_seqs": 4, "block_size": 4, "max_model_len": 64}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank")


def test_cpu_is_gloo_and_cuda_is_nccl_for_cuda_tensors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert process_group_backend(torch.device("cpu")) == "gloo"
    assert process_group_backend(torch.device("cuda", 1)) == "cpu:gloo,cuda:nccl"


def test_ranks_on_one_host_take_its_gpus_in_turn(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [resolve_device("cuda", rank) for rank in range(3)] == [torch.device("cuda", i) for i in (0, 1, 0)]


def test_bad_devices_name_the_field():
    with pytest.raises(InputError, match="device: unknown 'tpu'; allowed: cpu, cuda"):
        EngineConfig("m", device="tpu")
    with pytest.raises(InputError, match="speculative_config: method 'draft_model' runs on device cpu only"):
        EngineConfig("m", device="cuda", speculative_config={"method": "draft_model", "model": "d"})


def test_the_kv_cache_is_sized_from_the_gpu_on_cuda_and_from_the_host_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 << 30, 80 << 30))
    assert free_memory(torch.device("cuda", 0)) == 3 << 30
    assert free_memory(torch.device("cpu")) != 3 << 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_cuda_is_an_input_error_before_any_rank_starts(tiny_model_dir):
    model = str(tiny_model_dir("mixtral"))
    with pytest.raises(InputError, match="device: cuda is not available here"):
        LLM(model, device="cuda", **ARGS)
    with pytest.raises(InputError, match="device: cuda is not available here"):
        LLM(model, device="cuda", data_parallel_size=2, enable_expert_parallel=True, **ARGS)


def test_several_ranks_on_cuda_wait_for_the_nccl_opt_in(tiny_model_dir, monkeypatch):
    """The NCCL expert-parallel path has not run on a GPU: on a (pretend) GPU host it is refused, naming
    the switch that opts in; with it the ranks start (here: the point where they would)."""
    from meshserve.engine.distributed import frontend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    model, ep = str(tiny_model_dir("mixtral")), {"data_parallel_size": 2, "enable_expert_parallel": True}
    with pytest.raises(InputError, match="device: several ranks on cuda .* set MESHSERVE_CUDA_EP=nccl"):
        LLM(model, device="cuda", **ep, **ARGS)

    def started(spec, oversubscribe=False):
        raise RuntimeError(f"ranks start on {spec.config.device} with {spec.config.switches}")

    monkeypatch.setattr(frontend, "start_ranks", started)
    with pytest.raises(RuntimeError, match="ranks start on cuda with .*'MESHSERVE_CUDA_EP': 'nccl'"):
        LLM(model, device="cuda", switches={"MESHSERVE_CUDA_EP": "nccl"}, **ep, **ARGS)


def cpu_tokens(model: str) -> list[list[int]]:
    with LLM(model, **ARGS) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@needs_cuda
@pytest.mark.parametrize("attention", ["auto", "triton"])  # the default (reference) and the opt-in
def test_one_process_on_cuda_gives_the_cpu_tokens(tiny_model_dir, attention):
    if attention == "triton":
        pytest.importorskip("triton")
    model = str(tiny_model_dir("mixtral"))
    with LLM(model, device="cuda", switches={"MESHSERVE_ATTENTION": attention}, **ARGS) as llm:
        assert llm.engine.kv_caches[0].device.type == "cuda"
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == cpu_tokens(model)


@needs_two_gpus
def test_two_ranks_on_nccl_give_the_cpu_tokens_while_experts_migrate(tiny_model_dir):
    model = str(tiny_model_dir("mixtral"))
    eplb = {"window_size": 2, "step_interval": 2, "num_redundant_experts": 2, "chunk_bytes": 16384}
    with LLM(
        model,
        device="cuda",
        data_parallel_size=2,
        enable_expert_parallel=True,
        enable_eplb=True,
        eplb_config=eplb,
        switches={"MESHSERVE_CUDA_EP": "nccl"},  # the opt-in this test exists to justify
        **ARGS,
    ) as llm:
        want = cpu_tokens(model)
        for _ in range(3):
            assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == want
        assert [m for m in llm.engine.migrations if not m.get("error")]
