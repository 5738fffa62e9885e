"""Chat prompts: the model's template rendered as transformers renders it; a plain fallback without one."""

from __future__ import annotations

import json
import shutil

import pytest

from meshserve import LLM, SamplingParams
from meshserve.errors import InputError
from meshserve.models.loader import load_model

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "llama"
    shutil.copytree(tiny_model_dir("llama"), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    return path


def test_template_renders_like_transformers(chat_model):
    from transformers import PreTrainedTokenizerFast

    ours = load_model(chat_model).tokenizer
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(chat_model / "tokenizer.json"), chat_template=CHATML)
    expected = theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CHAT) == ours.encode(expected, add_special_tokens=False)


def test_plain_fallback_and_bad_messages(tiny_model_dir):
    tokenizer = load_model(tiny_model_dir("llama")).tokenizer
    assert tokenizer.chat_template is None
    ids = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert tokenizer.decode(ids) == "user: hi\nassistant:"
    for bad, field in [
        ([], "messages"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ("hi", "messages"),
    ]:
        with pytest.raises(InputError) as err:
            tokenizer.apply_chat_template(bad)
        assert err.value.field == field


def test_llm_chat_equals_generate_on_the_rendered_prompt(chat_model):
    llm = LLM(str(chat_model), max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    (reply,) = llm.chat(CHAT, params, use_tqdm=False)
    (same,) = llm.generate(llm.tokenizer.apply_chat_template(CHAT), params, use_tqdm=False)
    assert reply.token_ids == same.token_ids and len(llm.chat([CHAT, CHAT], params, use_tqdm=False)) == 2
