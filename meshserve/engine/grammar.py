"""Constrained decoding: one grammar matcher per completion and a token bitmask per step (xgrammar).

A request whose SamplingParams carry ``structured_outputs`` gets one xgrammar ``GrammarMatcher`` per
completion (n > 1: one each). Before a row is sampled its matcher fills that row's bitmask (one bit per
token id, 1 = allowed) and one native pass over the batch sets every forbidden logit to -inf; the
token sampled is then accepted into the matcher. A verify walks the drafts instead: row j's mask is the
state after drafts 1..j, the walk stops at the first draft the grammar rejects, and the matcher rolls
back. The target's masked pick at that row can never equal the rejected draft, so verify rejects it as it
rejects any mismatch, and every kept token is one the grammar allows.

Compiling is thread safe and cached by spec (xgrammar's compiler cache): the server compiles in a worker
thread before the request reaches the engine, so the engine thread only finds it in the cache.
xgrammar was picked over llguidance by measured mask time (benchmarks/structured.py, docs/engine.md).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import torch

from meshserve.engine.structured_params import StructuredOutputsParams
from meshserve.errors import InputError

MAX_WHITESPACE = 4  # longest whitespace run between JSON tokens when any whitespace is allowed


class Grammars:
    """Compiles specs for one tokenizer (lazily: xgrammar is imported on the first structured request)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, list(stop_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    @property
    def compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                backend = self.tokenizer.backend
                vocab = [backend.id_to_token(i) or "" for i in range(backend.get_vocab_size())]
                meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
                info = xgr.TokenizerInfo(
                    vocab, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids, **meta
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def compile(self, spec: StructuredOutputsParams, field: str = "structured_outputs") -> Any:
        """The compiled grammar for ``spec``; a schema, regex or grammar xgrammar refuses raises InputError
        naming ``field`` (with the spec's kind: ``response_format`` -> ``response_format.json``)."""
        compiler, kind = self.compiler, spec.kind
        try:
            if kind == "json":
                return compiler.compile_json_schema(
                    spec.json,
                    any_whitespace=not spec.disable_any_whitespace,
                    max_whitespace_cnt=None if spec.disable_any_whitespace else MAX_WHITESPACE,
                )
            if kind == "json_object":
                return compiler.compile_json_schema(
                    '{"type": "object"}',
                    any_whitespace=not spec.disable_any_whitespace,
                    max_whitespace_cnt=None if spec.disable_any_whitespace else MAX_WHITESPACE,
                )
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":  # JSON string literals are EBNF string literals
                return compiler.compile_grammar("root ::= " + " | ".join(map(json.dumps, spec.choice)))
            return compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as err:  # xgrammar's refusals of the spec
            message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise InputError(f"{field}.{kind}", f"cannot be compiled: {message[:300]}") from None

    def matcher(self, spec: StructuredOutputsParams) -> Any:
        """A fresh matcher for one completion (the grammar comes from the cache when compiled before)."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(spec))


def words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def decode_bitmask(matchers: Sequence[Any], vocab_size: int) -> torch.Tensor | None:
    """int32 [R, words]: each constrained row's allowed tokens (unconstrained rows allow all); None when no
    row is constrained."""
    if all(m is None for m in matchers):
        return None
    bitmask = torch.full((len(matchers), words(vocab_size)), -1, dtype=torch.int32)
    for i, m in enumerate(matchers):
        if m is not None and not m.is_terminated():
            m.fill_next_token_bitmask(bitmask, i)
    return bitmask


def verify_bitmask(
    matchers: Sequence[Any], drafts: Sequence[Sequence[int]], width: int, vocab_size: int
) -> torch.Tensor | None:
    """int32 [R * width, words]: row i * width + j is request i's mask after its drafts 1..j. Rows past a
    draft the grammar rejects allow all (verify never keeps their tokens); each matcher ends where it
    began."""
    if all(m is None for m in matchers):
        return None
    bitmask = torch.full((len(matchers) * width, words(vocab_size)), -1, dtype=torch.int32)
    for i, (m, d) in enumerate(zip(matchers, drafts, strict=True)):
        if m is None:
            continue
        walked = 0
        for j in range(width):
            if m.is_terminated():
                break
            m.fill_next_token_bitmask(bitmask, i * width + j)
            if j == len(d) or not m.accept_token(d[j]):
                break
            walked += 1
        if walked:
            m.rollback(walked)
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor | None) -> torch.Tensor:
    """``logits`` [R, V] float32 with every token a row's bitmask forbids at -inf, in place, by xgrammar's
    native kernel (one pass over the masked rows; 2-3x the speed of unpacking the bits with torch ops,
    benchmarks/structured.py). Rows whose mask allows everything are skipped."""
    if bitmask is None:
        return logits
    rows = torch.nonzero((bitmask != -1).any(dim=1)).flatten().tolist()
    if rows:
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)
    return logits
