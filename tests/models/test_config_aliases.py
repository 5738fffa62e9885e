"""config.json fields under every name transformers accepts, and generation_config.json defaults."""

from __future__ import annotations

import json
import shutil

import pytest

from meshserve import LLM
from meshserve.errors import InputError
from meshserve.models.loader import load_model


def rewrite(src, dst, change):
    shutil.copytree(src, dst)
    for name, edit in change.items():
        data = json.loads((dst / name).read_text())
        edit(data)
        (dst / name).write_text(json.dumps(data))
    return dst


def test_qwen3_moe_saved_by_transformers_5_uses_num_local_experts(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen3_moe")
    renamed = {"config.json": lambda c: c.update(num_local_experts=c.pop("num_experts"))}
    path = rewrite(src, tmp_path / "m", renamed)
    assert load_model(path).config.num_experts == load_model(src).config.num_experts == 4


def test_mixtral_accepts_num_experts_and_refuses_disagreement(tiny_model_dir, tmp_path):
    src = tiny_model_dir("mixtral")
    renamed = {"config.json": lambda c: c.update(num_experts=c.pop("num_local_experts"))}
    path = rewrite(src, tmp_path / "a", renamed)
    assert load_model(path).config.num_experts == 4
    bad = rewrite(src, tmp_path / "b", {"config.json": lambda c: c.update(num_experts=8)})
    with pytest.raises(InputError) as err:
        load_model(bad)
    assert err.value.field == "config.json:num_experts" and "num_local_experts" in err.value.message


def test_generation_config_gives_the_default_sampling_params(tiny_model_dir, tmp_path):
    path = rewrite(
        tiny_model_dir("llama"),
        tmp_path / "g",
        {
            "generation_config.json": lambda g: g.update(
                temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=7
            )
        },
    )
    llm = LLM(str(path), max_model_len=64)
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.6, 0.9, 20, 7)
    (out,) = llm.generate([1, 5, 6], use_tqdm=False)
    assert len(out.token_ids) <= 7
