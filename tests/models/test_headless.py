"""A decoder saved without its LM head (architectures: LlamaModel, tensors without the ``model.`` prefix),
as embedding checkpoints are: it loads, embeds as transformers' AutoModel computes, and refuses to
generate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from meshserve.engine import LLM, PoolingParams, SamplingParams
from meshserve.errors import InputError
from meshserve.server.tasks import resolve_task


@pytest.fixture(scope="module")
def headless_dir(tiny_model_dir, tmp_path_factory):
    source = tiny_model_dir("llama")
    target = tmp_path_factory.mktemp("llama-model")
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, target / file.name)
    tensors = {}
    for file in source.glob("*.safetensors"):
        tensors |= {k.removeprefix("model."): v for k, v in load_file(file).items() if k != "lm_head.weight"}
    save_file(tensors, target / "model.safetensors")
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaModel"]}))
    (target / "model.safetensors.index.json").unlink(missing_ok=True)
    return target


def test_headless_checkpoint_embeds_as_transformers(headless_dir):
    prompt = [1, 17, 4, 99, 23, 8]
    hf = AutoModel.from_pretrained(headless_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = hf(torch.tensor([prompt])).last_hidden_state[0]
    llm = LLM(str(headless_dir), dtype="float32")
    assert llm.engine.model_config.headless and resolve_task("auto", llm.engine.model_config) == "embed"
    (out,) = llm.embed([prompt], PoolingParams("MEAN"), use_tqdm=False)
    torch.testing.assert_close(out.embedding, torch.nn.functional.normalize(hidden.mean(0), dim=0))
    with pytest.raises(
        InputError, match="sampling_params: model .* has no LM head: it serves embeddings only"
    ):
        llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)
