"""Text that is not valid Unicode (lone surrogates) is one InputError naming the field on every door of
the Python API, as it is a 400 on every HTTP endpoint (tests/server/test_hardening.py)."""

from __future__ import annotations

import pytest

from meshserve.engine import LLM, SamplingParams
from meshserve.errors import InputError

BAD = ["\ud800", "fine \udfff", "\udbff\udbff"]


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("llama")), max_model_len=64, block_size=4)


@pytest.mark.parametrize("text", BAD)
def test_generate_chat_and_stop_strings_refuse_lone_surrogates(llm, text):
    with pytest.raises(InputError, match="is not valid Unicode") as err:
        llm.generate([text], use_tqdm=False)
    assert err.value.field == "prompt"
    with pytest.raises(InputError, match="is not valid Unicode") as err:
        llm.chat([{"role": "user", "content": text}], use_tqdm=False)
    assert err.value.field == "messages[0].content"
    with pytest.raises(InputError, match="is not valid Unicode") as err:
        SamplingParams(stop=[text])
    assert err.value.field == "stop"
    (out,) = llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)  # nothing was left behind
    assert len(out.outputs[0].token_ids) == 2 and not llm.engine.has_unfinished()


def test_a_prompt_longer_than_any_fitting_text_is_refused_before_tokenizing(llm):
    limit = llm.engine.tokenizer.max_chars
    with pytest.raises(InputError, match=f"at most {limit}") as err:
        llm.generate(["x" * (limit + 1)], use_tqdm=False)
    assert err.value.field == "prompt"
