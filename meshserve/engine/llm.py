"""LLM: the offline batch API, as in vLLM.

    llm = LLM("path/to/model", max_num_batched_tokens=512)
    llm = LLM("path/to/moe", data_parallel_size=4, enable_expert_parallel=True)  # N rank processes
    outputs = llm.generate(["Hello", "The sky is"], SamplingParams(temperature=0, max_tokens=32))
    outputs[0].text, outputs[0].token_ids, outputs[0].finish_reason, outputs[0].metrics
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from meshserve.config import EngineConfig
from meshserve.engine.engine import Engine
from meshserve.engine.outputs import RequestOutput
from meshserve.engine.sampling_params import SamplingParams
from meshserve.errors import InputError

if TYPE_CHECKING:
    from meshserve.engine.distributed import DistributedEngine

Prompt = str | Sequence[int]


class LLM:
    """A model plus an engine; ``generate`` runs prompts to completion and returns them in order.

    Use as a context manager (or call ``close``) so an expert trace asked for with
    ``record_expert_trace=PATH`` gets written.
    """

    def __init__(self, model: str, **engine_args: Any) -> None:
        config = EngineConfig.from_args(model, **engine_args)
        if config.parallel.distributed:  # data_parallel_size > 1 or enable_expert_parallel
            from meshserve.engine.distributed import DistributedEngine

            self.engine: Engine | DistributedEngine = DistributedEngine(config)
        else:
            self.engine = Engine(config)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string, a token-id list, or a list of either)."""
        prompts = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InputError("sampling_params", f"got {len(params)} for {len(prompts)} prompts; "
                                                    "give one, or one per prompt")
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(self.engine.add_request(prompt, p))
        except InputError:
            for request_id in ids:  # all or nothing: leave the engine as it was
                self.engine.abort(request_id)
            raise
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while len(done) < len(ids) and self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]

    def close(self) -> None:
        """Finish up: writes the expert trace when one was asked for."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt given as token ids
    if not prompts:
        raise InputError("prompts", "must not be empty")
    return prompts
