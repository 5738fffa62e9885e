"""The front door's text work, kept off the engine thread (as vLLM's API process does it).

The engine thread only steps. Before a request reaches it, its prompt text is tokenized here: short
prompts inline, long ones in a small thread pool (``Tokenizer.encode`` releases the GIL, so the engine
thread's Python keeps running beside it). Streamed outputs come back as token ids; ``OutputText``
turns them into text in the caller's thread, one incremental detokenizer per completion. Requests with
stop strings are the exception: matching a stop string needs the text where the stop is decided, so
the engine detokenizes those itself and their text passes through.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from meshserve.engine.outputs import RequestOutput
from meshserve.errors import require

INLINE_CHARS = 4096  # shorter prompts tokenize in well under a millisecond: not worth a thread hop
TOKENIZER_THREADS = 2


class PromptTokenizer:
    """Token ids of prompt text for the engine; text over INLINE_CHARS is tokenized in a thread pool."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="meshserve-tokenize")

    async def __call__(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return prompt  # token ids: the engine checks them
        require(bool(prompt), "prompt", "must not be empty")
        if len(prompt) <= INLINE_CHARS:
            return self.tokenizer.encode(prompt)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.tokenizer.encode, prompt)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class OutputText:
    """Text deltas of one streamed request's completions, made from the token ids the engine sends.

    The result equals what the engine would have sent: the incremental detokenizer's text while a
    completion runs, and on its last delta the full decode, less the EOS / stop token that ended it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._streams: dict[int, Any] = {}  # completion index -> IncrementalDetokenizer
        self._sent: dict[int, int] = {}  # completion index -> characters sent

    def fill(self, out: RequestOutput) -> RequestOutput:
        for completion in out.outputs:
            index = completion.index
            stream = self._streams.get(index)
            if stream is None:
                stream = self._streams[index] = self.tokenizer.detokenizer()
            sent = self._sent.get(index, 0)
            if completion.finish_reason is None:
                for token in completion.token_ids:
                    stream.add(token)
                text = stream.text
            else:
                ids = stream.ids + list(completion.token_ids)
                if ids and completion.finish_reason == "stop":
                    ids = ids[:-1]  # EOS or a stop token id ended it; it is not part of the text
                text = self.tokenizer.decode(ids)
            completion.text = text[sent:]
            self._sent[index] = max(len(text), sent)
        return out
