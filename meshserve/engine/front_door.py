"""The front door's text work, kept off the engine thread (as vLLM's API process does it).

The engine thread only steps. Before a request reaches it, its prompt text is tokenized here: short
prompts inline, long ones in a small thread pool (``Tokenizer.encode`` releases the GIL, so the engine
thread's Python keeps running beside it). Streamed outputs come back as token ids; ``OutputText``
turns them into text in the caller's thread, one incremental detokenizer per completion, and matches
stop strings there (the engine never looks for them). A completion that reaches one ends here at once:
its text is cut as the engine would have cut it, tokens the engine made past it are dropped (the engine
may be a step or a verify ahead), and the caller aborts it in the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from meshserve.engine.outputs import CompletionOutput, RequestOutput
from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.stop import StopStrings, final_text
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

    The result equals what the engine would have sent had it made the text (StopChecker): the text while
    a completion runs (less a tail that could start a stop string), and on its last delta the full
    decode less the EOS / stop token that ended it, or the text cut at the stop string that ended it.
    ``stopped``: the completions the last ``fill`` ended on a stop string (still running in the engine).
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self._texts: dict[int, StopStrings] = {}  # completion index -> its text so far
        self._sent: dict[int, int] = {}  # completion index -> characters sent
        self._done: set[int] = set()  # completions that have sent their last delta
        self.stopped: list[int] = []

    def fill(self, out: RequestOutput) -> RequestOutput:
        """A copy of ``out`` with its completions' text filled in; ``finished`` once every completion has
        ended. ``out`` itself is the engine thread's (its metrics hook reads it): it is not changed."""
        self.stopped = []
        kept = []
        for completion in out.outputs:
            index = completion.index
            if index in self._done:
                continue  # tokens the engine made past this completion's stop string
            completion = dataclasses.replace(completion)
            text = self._texts.get(index)
            if text is None:
                text = self._texts[index] = StopStrings(self.tokenizer, self.params)
            if self._add(text, completion):
                self.stopped.append(index)
            if completion.finish_reason is None:
                full = text.streamable()
            else:
                self._done.add(index)
                full = final_text(self.tokenizer, text.ids, completion.finish_reason, text)
            sent = self._sent.get(index, 0)
            completion.text = full[sent:]
            self._sent[index] = max(len(full), sent)
            kept.append(completion)
        return dataclasses.replace(
            out, outputs=kept, finished=out.finished or len(self._done) == self.params.n
        )

    def _add(self, text: StopStrings, completion: CompletionOutput) -> bool:
        """Add the completion's new tokens in order, as StopChecker.check would; True when one completes a
        stop string (the completion then ends with it, and the tokens after it are dropped)."""
        tokens = completion.token_ids
        for k, token in enumerate(tokens):
            delta = text.add(token)
            if k == len(tokens) - 1 and self._ended_on(token, completion):
                return False  # EOS, a stop token id or a refused token ended it: never a stop string
            if text.match(delta):
                completion.token_ids = tokens[: k + 1]
                if completion.logprobs is not None:
                    completion.logprobs = completion.logprobs[: k + 1]
                completion.finish_reason, completion.stop_reason = "stop", text.stop
                return True
        return False

    def _ended_on(self, token: int, completion: CompletionOutput) -> bool:
        if completion.finish_reason == "error":
            return True
        return completion.finish_reason == "stop" and (token == completion.stop_reason or token in self.eos)
