"""Response bodies: each choice's running state, turned into OpenAI JSON (whole responses or SSE chunks)."""

from __future__ import annotations

import math
from typing import Any

from meshserve.engine.outputs import CompletionOutput

# JSON has no infinities: a -inf logprob (a banned token) is reported as this, as vLLM does
MIN_LOGPROB = -9999.0


def finite_logprob(value: float) -> float:
    return value if math.isfinite(value) and value > MIN_LOGPROB else MIN_LOGPROB


class ChoiceState:
    """One choice (one of a prompt's n completions): text and tokens so far, and how it ended."""

    def __init__(self, index: int, tokenizer: Any, logprobs: bool, chat: bool) -> None:
        self.index, self.tokenizer, self.want_logprobs, self.chat = index, tokenizer, logprobs, chat
        self.text = ""
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[tuple[int, dict[int, float]]] = []
        self.sent_role = False
        self.prompt_logprobs: list[dict[int, float] | None] | None = None

    def delta(self, out: CompletionOutput) -> dict[str, Any] | None:
        """Take a delta from the engine; the chunk's choice for it (None when there is nothing to send)."""
        new_logprobs = (
            list(zip(out.token_ids, out.logprobs or [], strict=False)) if self.want_logprobs else []
        )
        self.text += out.text
        self.num_tokens += len(out.token_ids)
        self.logprobs += new_logprobs
        self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
        if not out.token_ids and not out.text and not out.finish_reason and self.sent_role:
            return None  # one chunk per step with new tokens, even if their text is still held back
        choice: dict[str, Any] = {
            "index": self.index,
            "logprobs": self._logprobs(new_logprobs),
            "finish_reason": out.finish_reason,
        }
        if self.chat:
            choice["delta"] = {"content": out.text}
            if not self.sent_role:
                choice["delta"]["role"] = "assistant"
        else:
            choice["text"] = out.text
            choice["stop_reason"] = out.stop_reason
        self.sent_role = True
        return choice

    def final_choice(self) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": self.index,
            "logprobs": self._logprobs(self.logprobs),
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
        }
        if self.chat:
            choice["message"] = {"role": "assistant", "content": self.text}
        else:
            choice["text"] = self.text
        if self.prompt_logprobs is not None:  # vLLM's shape: per position None or {token id: details}
            choice["prompt_logprobs"] = [
                None
                if entry is None
                else {
                    str(t): {"logprob": finite_logprob(v), "decoded_token": self._token_text(t)}
                    for t, v in entry.items()
                }
                for entry in self.prompt_logprobs
            ]
        return choice

    def _logprobs(self, entries: list[tuple[int, dict[int, float]]]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        token = self._token_text
        entries = [(t, {i: finite_logprob(v) for i, v in top.items()}) for t, top in entries]
        if self.chat:
            return {
                "content": [
                    {
                        "token": token(t),
                        "logprob": top[t],
                        "bytes": list(token(t).encode()),
                        "top_logprobs": [
                            {"token": token(i), "logprob": v, "bytes": list(token(i).encode())}
                            for i, v in top.items()
                        ],
                    }
                    for t, top in entries
                ]
            }
        offsets, at = [], len(self.text) - sum(len(token(t)) for t, _ in entries)
        for t, _ in entries:
            offsets.append(at)
            at += len(token(t))
        return {
            "tokens": [token(t) for t, _ in entries],
            "token_logprobs": [top[t] for t, top in entries],
            # keyed by text: where tokens decode alike, the sampled one's value is kept
            "top_logprobs": [
                {token(i): v for i, v in top.items() if i != t} | {token(t): top[t]} for t, top in entries
            ],
            "text_offset": offsets,
        }

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def usage(prompt_tokens: list[int], states: list[ChoiceState]) -> dict[str, int]:
    """OpenAI usage: each prompt counted once (not once per completion), every completion's tokens."""
    completion = sum(s.num_tokens for s in states)
    prompt = sum(prompt_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_chunk(header: dict[str, Any], choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {**header, "object": "text_completion", "choices": choices}


def chat_chunk(header: dict[str, Any], choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {**header, "object": "chat.completion.chunk", "choices": choices}
