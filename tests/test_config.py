"""Engine settings: num_threads (vLLM-style engine argument) and the GEMM profile the engine loads."""

from __future__ import annotations

import pytest
import torch

from meshserve.config import EngineConfig, available_cores
from meshserve.engine import LLM, SamplingParams
from meshserve.errors import InputError
from meshserve.kernels.smooth_gemm import SmoothLinear


def test_num_threads_defaults_to_the_cores_this_process_may_use():
    assert EngineConfig("m").num_threads == available_cores() >= 1
    assert EngineConfig("m", num_threads=1).num_threads == 1


@pytest.mark.parametrize("bad", [0, -2, available_cores() + 1, 1.5, "2", True])
def test_bad_num_threads_names_the_field_and_the_limit(bad):
    with pytest.raises(InputError) as err:
        EngineConfig.from_args("m", num_threads=bad)
    assert err.value.field == "num_threads" and f"[1, {available_cores()}]" in err.value.message


def test_engine_sets_torch_threads_and_prepares_every_linear_layer(tiny_model_dir):
    before = torch.get_num_threads()
    try:
        llm = LLM(str(tiny_model_dir("llama")), num_threads=1, max_num_batched_tokens=64)
        assert torch.get_num_threads() == 1
        layers = [m for m in llm.engine.model.modules() if isinstance(m, SmoothLinear)]
        assert layers and all(m._by_m is not None and len(m._by_m) == 65 for m in layers)
        (out,) = llm.generate([[1, 5, 9]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
        assert len(out.token_ids) == 3
    finally:
        torch.set_num_threads(before)


def test_missing_kernel_profile_is_an_input_error(tiny_model_dir, tmp_path):
    with pytest.raises(InputError) as err:
        LLM(str(tiny_model_dir("llama")), kernel_profile=str(tmp_path / "nope.json"))
    assert err.value.field == "kernel_profile"
