"""LLM: the offline batch API, as in vLLM.

llm = LLM("path/to/model", max_num_batched_tokens=512)
llm = LLM("path/to/moe", data_parallel_size=4, enable_expert_parallel=True)  # N rank processes
outputs = llm.generate(["Hello", "The sky is"], SamplingParams(temperature=0, max_tokens=32))
outputs[0].text, outputs[0].token_ids, outputs[0].finish_reason, outputs[0].metrics
llm.embed(["Hello", "The sky is"])[0].embedding   # final hidden states pooled: float32 [hidden]
llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=32))  # the model's chat template
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from meshserve.config import EngineConfig
from meshserve.engine.engine import Engine
from meshserve.engine.outputs import RequestOutput
from meshserve.engine.pooling import PoolingParams
from meshserve.engine.sampling_params import MAX_CHOICES, SamplingParams
from meshserve.errors import InputError

if TYPE_CHECKING:
    from meshserve.engine.distributed import DistributedEngine
    from meshserve.engine.pd.frontend import PDEngine

Prompt = str | Sequence[int] | dict[str, Any]


def make_engine(config: EngineConfig) -> Engine | DistributedEngine | PDEngine:
    """An Engine in this process, or N rank processes behind a DistributedEngine (data_parallel_size > 1
    or enable_expert_parallel)."""
    if config.pd is not None:  # a prefill and a decode process (engine/pd/)
        from meshserve.engine.pd.frontend import PDEngine

        return PDEngine(config)
    if config.parallel.distributed:
        from meshserve.engine.distributed import DistributedEngine

        return DistributedEngine(config)
    return Engine(config)


class LLM:
    """A model plus an engine; ``generate`` runs prompts to completion and returns them in order.

    Use as a context manager (or call ``close``) so an expert trace asked for with
    ``record_expert_trace=PATH`` gets written.
    """

    def __init__(self, model: str, **engine_args: Any) -> None:
        self.engine = make_engine(EngineConfig.from_args(model, **engine_args))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string, a token-id list, a vLLM prompt dict, or a list of them).

        All or nothing: when anything goes wrong (bad input, Ctrl-C) the requests this call added are
        aborted, so the engine serves later calls as if this one never happened. Any number of prompts
        is served (vLLM's offline batch), but at most MAX_CHOICES completions (prompts x n, the bound of
        one HTTP request) are in the engine at once: the next prompt goes in as earlier ones finish.
        """
        prompts = _as_prompt_list(prompts)
        default = self.get_default_sampling_params
        params = _per_prompt(sampling_params, default, SamplingParams, "sampling_params", len(prompts))
        return self._run(prompts, params, use_tqdm)

    def embed(
        self,
        prompts: Prompt | Sequence[Prompt],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One embedding per prompt (``out.embedding``, float32 [hidden]): the final hidden states pooled
        as ``pooling_params`` says (default: the checkpoint's sentence-transformers pooling, else LAST,
        L2-normalized). Each runs through the engine as a prefill-only request; all or nothing."""
        prompts = _as_prompt_list(prompts)
        default = self.get_default_pooling_params
        params = _per_prompt(pooling_params, default, PoolingParams, "pooling_params", len(prompts))
        return self._run(prompts, params, use_tqdm)

    def _run(self, prompts: list[Prompt], params: list[Any], use_tqdm: bool) -> list[RequestOutput]:
        """Step until every prompt's request finished, adding prompts while fewer than MAX_CHOICES
        completions of this call are in the engine. All or nothing: on any error (bad input, Ctrl-C)
        the requests this call added are aborted."""
        ids: list[str] = []
        done: dict[str, RequestOutput] = {}
        width: dict[str, int] = {}  # request id -> its completions (n), while in the engine
        try:
            with tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm) as bar:
                while len(done) < len(prompts):
                    while len(ids) < len(prompts):
                        p = params[len(ids)]
                        n = p.n if isinstance(p, SamplingParams) else 1  # add_request refuses a non-params
                        if width and sum(width.values()) + n > MAX_CHOICES:
                            break
                        ids.append(self.engine.add_request(prompts[len(ids)], p))
                        width[ids[-1]] = n
                    if not self.engine.has_unfinished():
                        break
                    for out in self.engine.step():
                        if out.request_id in width:
                            done[out.request_id] = out
                            del width[out.request_id]
                            bar.update(1)
                    for request in list(getattr(self.engine, "handoffs", ())):  # role prefill, offline: no
                        self.engine.release(request)  # decode engine takes them; outputs end at "handoff"
            return [done[i] for i in ids]
        except BaseException:  # take back what this call added, so later calls run as if it never happened
            for request_id in ids:
                self.engine.abort(request_id)
            raise

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Generate a reply to one conversation (a list of {"role", "content"} messages) or to each of
        several, formatted with the model's chat template (tokenizer_config.json) or a plain fallback;
        ``tools`` (OpenAI's function specs) go to the template, as vLLM's ``LLM.chat`` passes them."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt, tools) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (vLLM's behaviour)."""
        return SamplingParams(**self.engine.model_config.generation_defaults)

    def get_default_pooling_params(self) -> PoolingParams:
        """PoolingParams with the checkpoint's sentence-transformers pooling, else LAST, normalized."""
        return PoolingParams(**self.engine.model_config.pooling_defaults)

    def close(self) -> None:
        """Finish up: writes the expert trace when one was asked for."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _per_prompt(given: object, default: Callable[[], Any], kind: type, field: str, n: int) -> list[Any]:
    """One params object per prompt: ``given`` is None (``default()`` for all), one ``kind`` for all, or a
    list of one per prompt."""
    if given is None:
        return [default()] * n
    if isinstance(given, kind):
        return [given] * n
    if not isinstance(given, list | tuple):
        raise InputError(field, f"must be a {kind.__name__} or a list of them, got {type(given).__name__}")
    if len(given) != n:
        raise InputError(field, f"got {len(given)} for {n} prompts; give one, or one per prompt")
    return list(given)


def _as_prompt_list(prompts: object) -> list[str | list[int]]:
    """One prompt or a list of them, each a str, token ids, or vLLM's {"prompt"} / {"prompt_token_ids"}."""
    if isinstance(prompts, str | dict) or _is_token_ids(prompts):
        prompts = [prompts]
    if not isinstance(prompts, list | tuple):
        raise InputError("prompts", f"must be a prompt or a list of prompts, got {type(prompts).__name__}")
    if not prompts:
        raise InputError("prompts", "must not be empty")
    return [_one_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]


def _is_token_ids(value: object) -> bool:
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in value)
    )


def _one_prompt(prompt: object, field: str) -> str | list[int]:
    if isinstance(prompt, dict):
        keys = set(prompt)
        if keys == {"prompt"} and isinstance(prompt["prompt"], str):
            return prompt["prompt"]
        if keys == {"prompt_token_ids"} and _is_token_ids(prompt["prompt_token_ids"]):
            return [int(t) for t in prompt["prompt_token_ids"]]
        raise InputError(
            field,
            'a dict prompt must be {"prompt": str} or {"prompt_token_ids": [int, ...]}, '
            f"got keys {sorted(map(str, keys))}",
        )
    if isinstance(prompt, str):
        return prompt
    if _is_token_ids(prompt):
        return [int(t) for t in prompt]
    raise InputError(
        field,
        'must be a string, a list of token ids, or a {"prompt": ...} / '
        f'{{"prompt_token_ids": ...}} dict, got {type(prompt).__name__}',
    )
