"""Tokenizer and streaming detokenizer: same ids as transformers, deltas that add up to the full text."""

from __future__ import annotations

from transformers import AutoTokenizer

from meshserve.models import load_model

TEXTS = ["hello world", "The quick brown fox.", "héllo 世界 🙂 ok", "  spaces\n\nnewlines\t"]


def test_encode_decode_like_transformers(tiny_model_dir):
    path = tiny_model_dir("llama")
    tok = load_model(path).tokenizer
    hf = AutoTokenizer.from_pretrained(path)
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids) == text == hf.decode(ids, skip_special_tokens=True)


def test_incremental_detokenizer_streams_the_full_text(tiny_model_dir):
    tok = load_model(tiny_model_dir("llama")).tokenizer
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        stream = tok.detokenizer()
        deltas = [stream.add(i) for i in ids]
        assert "".join(deltas) == stream.text == text
        assert not any("\ufffd" in d for d in deltas)  # split multi-byte characters are held back
