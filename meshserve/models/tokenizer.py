"""Tokenizer from tokenizer.json via the `tokenizers` library (no transformers at runtime), plus streaming."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from meshserve.errors import InputError
from meshserve.errors import text as checked_text
from meshserve.models.chat_template import check_messages, read_chat_template, render_chat

MAX_CHARS_SLACK = 4


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_id(tok: HFTokenizer, extra: dict[str, Any], key: str) -> int | None:
    """The id of a special token tokenizer_config.json names; a name tokenizer.json lacks is an error."""
    value = extra.get(key)
    if value is None:
        return None
    text = _token_text(value)
    if text is None:
        raise InputError(
            f"tokenizer_config.json:{key}", f'expected a string or {{"content": ...}}, got {value!r}'
        )
    token_id = tok.token_to_id(text)
    if token_id is None:
        raise InputError(f"tokenizer_config.json:{key}", f"{text!r} is not a token of tokenizer.json")
    return token_id


class Tokenizer:
    """encode / decode text; knows the model's BOS and EOS ids."""

    def __init__(self, tokenizer: HFTokenizer, bos_token_id: int | None, eos_token_ids: list[int]) -> None:
        self._tok = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.chat_template: str | None = None
        # Longest text a prompt may have (set by the engine from max_model_len): checked before tokenizing,
        # so a huge text costs nothing. None = no bound.
        self.max_chars: int | None = None

    @classmethod
    def from_dir(
        cls, path: Path, bos_token_id: int | None = None, eos_token_ids: Sequence[int] = ()
    ) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json for special tokens the model config lacks)."""
        file = path / "tokenizer.json"
        if not file.is_file():
            raise InputError("tokenizer.json", f"missing from {path}")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as err:  # the Rust side raises a bare Exception for any parse error
            raise InputError("tokenizer.json", f"cannot parse ({str(err)[:200]})") from None
        extra: dict[str, Any] = {}
        config = path / "tokenizer_config.json"
        if config.is_file():
            try:
                extra = json.loads(config.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise InputError("tokenizer_config.json", f"invalid JSON ({err})") from None
            if not isinstance(extra, dict):
                raise InputError("tokenizer_config.json", "expected a JSON object")
        if bos_token_id is None:
            bos_token_id = _special_id(tok, extra, "bos_token")
        eos = list(eos_token_ids)
        if not eos and (eos_id := _special_id(tok, extra, "eos_token")) is not None:
            eos = [eos_id]
        tokenizer = cls(tok, bos_token_id, eos)
        tokenizer.chat_template = read_chat_template(path)
        return tokenizer

    @property
    def backend(self) -> HFTokenizer:
        """The `tokenizers` tokenizer itself (its vocabulary and JSON, for the grammar compiler)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True, field: str = "prompt") -> list[int]:
        """Token ids of text; special tokens (e.g. BOS) as tokenizer.json's post-processor adds them.
        Text over ``max_chars`` or not valid Unicode raises InputError naming ``field``."""
        limit = self.max_chars
        if limit is not None and len(text) > limit:
            raise InputError(
                field, f"{len(text)} characters is too long: at most {limit} (more cannot fit max_model_len)"
            )
        try:
            # encode_batch releases the GIL (encode holds it): a long prompt tokenized in the front door's
            # thread pool does not stall the engine thread's Python between forwards.
            (encoding,) = self._tok.encode_batch(
                [checked_text(text, field)], add_special_tokens=add_special_tokens
            )
            return encoding.ids
        except (TypeError, ValueError) as err:  # not InputError: the Rust side's own refusals
            if isinstance(err, InputError):
                raise
            raise InputError(field, f"text cannot be tokenized ({str(err)[:120]})") from None

    def bound_prompt_chars(self, max_model_len: int) -> None:
        """Refuse texts longer than any that fits ``max_model_len`` tokens. A token's vocabulary string is
        at least as long as its text (byte-level and byte-fallback tokens spell a byte with one or more
        characters); x4 leaves room for normalizers that compose several characters into one."""
        longest = max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)
        self.max_chars = max_model_len * longest * MAX_CHARS_SLACK

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Any,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        add_special_tokens: bool | None = None,
    ) -> list[int]:
        """Token ids of a chat (OpenAI-style messages, and ``tools`` for the template) rendered with the
        model's chat template.

        A template writes its own special tokens (e.g. BOS), so by default (``add_special_tokens`` None)
        only the plain fallback adds them."""
        messages = check_messages(messages)
        special = [
            self._tok.id_to_token(i) if i is not None else None
            for i in (self.bos_token_id, (self.eos_token_ids or [None])[0])
        ]
        text = render_chat(
            messages, self.chat_template, special[0] or "", special[1] or "", add_generation_prompt, tools
        )
        if add_special_tokens is None:
            add_special_tokens = self.chat_template is None
        return self.encode(text, add_special_tokens=add_special_tokens, field="messages")

    def detokenizer(self) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer for one request's output."""
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Turns output tokens into text deltas one token at a time.

    Byte-level tokens can end inside a multi-byte character, and some decoders change earlier text
    (spaces) once the next token is known. So each step decodes a short window twice, from
    `prefix` to `read` (already emitted) and from `prefix` to the end, and emits the difference,
    holding it back while it ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly complete text (may be empty)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""
