"""Two engines in one process, stepping in two threads, keep to their own state: SmoothGEMM's staging
buffers (virtual padding) and the torch thread count."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from meshserve.config import available_cores
from meshserve.engine.engine import Engine
from meshserve.engine.llm import LLM
from meshserve.engine.sampling_params import SamplingParams

PROMPTS = [[1, 5 + i, 9, 3 * i + 2] * (2 + i) for i in range(4)]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture
def staged_profile(tmp_path):
    """A GEMM profile that runs every float32 linear layer through 16-row tiles, i.e. the staging buffer."""
    path = tmp_path / "gemm.json"
    path.write_text(
        json.dumps({"version": 1, "machine": "", "gemm": {"float32": {"*": [[1 << 20, "packed", 16]]}}})
    )
    return str(path)


def test_two_engines_stepping_in_two_threads_produce_their_own_tokens(tiny_model_dir, staged_profile):
    model = str(tiny_model_dir("llama"))
    args = {"kernel_profile": staged_profile, "num_threads": 1, "max_num_batched_tokens": 64, "block_size": 4}
    expected = [o.token_ids for o in LLM(model, **args).generate(PROMPTS, GREEDY, use_tqdm=False)]
    llms = [LLM(model, **args) for _ in range(2)]
    got: dict[int, list[list[int]]] = {}

    def run(i: int) -> None:
        outs = []
        for _ in range(3):  # several rounds: the threads must overlap in their GEMMs to race
            outs += [o.token_ids for o in llms[i].generate(PROMPTS[i:] + PROMPTS[:i], GREEDY, use_tqdm=False)]
        got[i] = outs

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert got[i] == 3 * (expected[i:] + expected[:i]), f"engine {i}'s tokens were changed by the other"


def test_each_engine_steps_with_its_own_thread_count(tiny_model_dir, monkeypatch):
    if available_cores() < 2:
        pytest.skip("needs 2 cores to give two engines different thread counts")
    before = torch.get_num_threads()
    model = str(tiny_model_dir("llama"))
    one = Engine.from_args(model, num_threads=1)
    Engine.from_args(model, num_threads=2)  # sets torch's threads after the first engine did
    seen = []
    execute = one.runner.execute
    monkeypatch.setattr(
        one.runner, "execute", lambda items: seen.append(torch.get_num_threads()) or execute(items)
    )
    one.add_request([1, 2, 3], GREEDY)
    one.step()
    torch.set_num_threads(before)  # the rest of this worker's tests run as they would have
    assert seen == [1]
