"""Engine: add requests, step, abort. One step = schedule -> one forward -> sample -> update.

The engine owns the model, the paged KV cache (allocated once here), the scheduler and the sampler.
Bad input raises InputError from ``add_request`` before anything changes, so requests already in
flight never notice.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
import torch

from meshserve import switches
from meshserve.config import ROLES, EngineConfig, SchedulerConfig
from meshserve.engine.device import free_memory, resolve_device
from meshserve.engine.grammar import Grammars, apply_bitmask, decode_bitmask
from meshserve.engine.groups import RequestGroup, child_ids, child_params
from meshserve.engine.kernel_profile import gemm_table_for
from meshserve.engine.kv_cache import BlockManager, allocate_kv_cache, block_bytes, num_kv_blocks
from meshserve.engine.logits_processors import process_logits
from meshserve.engine.outputs import RequestOutput
from meshserve.engine.pooling import PoolingParams, fold_chunks
from meshserve.engine.prefix_cache import PrefixCache
from meshserve.engine.prompt_logprobs import record_prompt_logprobs
from meshserve.engine.request import Request, RequestStatus
from meshserve.engine.runner import ModelRunner
from meshserve.engine.sampler import sample
from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.scheduler import Scheduler, WorkItem, WorkKind
from meshserve.engine.spec.decoder import SpecDecoder
from meshserve.engine.stop import StopChecker
from meshserve.engine.timeline import now
from meshserve.errors import InputError, require
from meshserve.kernels.profile import GemmTable
from meshserve.memory import MemoryNeed, check_memory, release_free_heap
from meshserve.models.config import dtype_name
from meshserve.models.layers.quant_experts import expert_weight_bytes
from meshserve.models.loader import build_model, load_config, meta_model, model_bytes, weight_bytes
from meshserve.traces import ExpertTrace

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Engine:
    """The serving loop's core: ``add_request`` / ``step`` / ``abort`` / ``has_unfinished`` / ``close``."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        require(
            not config.parallel.distributed,
            "data_parallel_size",
            "Engine runs one process; use LLM(...) or DistributedEngine for several ranks",
        )
        switches.use(config.switches)  # before the model loads: its layers choose their kernels then
        torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        mc, self.tokenizer = load_config(
            config.model, config.dtype, config.revision, config.quantization, config.quantize_lm_head
        )
        self.model_config = mc
        limit = mc.max_position_embeddings
        max_model_len = config.scheduler.max_model_len or limit
        require(
            max_model_len <= limit,
            "max_model_len",
            f"must be <= the model's max_position_embeddings ({limit}), got {max_model_len}",
        )
        require(
            config.record_expert_trace is None or mc.is_moe,
            "record_expert_trace",
            f"model {mc.name} ({mc.arch}) has no MoE layers to trace",
        )
        self.max_model_len = max_model_len
        self.tokenizer.bound_prompt_chars(max_model_len)
        sched = replace(config.scheduler, max_model_len=max_model_len)
        self._seeds = random.Random(config.seed)  # seeds of unseeded requests: a run reproduces as a whole
        spec = config.speculative_config
        self.spec = (
            None
            if spec is None
            else SpecDecoder(spec, mc, max_model_len, sched.max_num_seqs, config.cache.block_size)
        )
        cache = config.cache
        tokens = sched.max_num_batched_tokens  # the kernel table covers steps up to this many tokens
        table = (
            gemm_table_for(meta_model(mc), config.kernel_profile, tokens)
            if self.device.type == "cpu"
            else None
        )
        per_block = block_bytes(
            mc.num_layers, mc.num_kv_heads, mc.head_dim, cache.block_size, mc.dtype, mc.kv_cache_parts
        )
        draft_kv = 0 if self.spec is None else self.spec.kv_bytes  # the draft's own KV shares the budget
        blocks = self._check_memory(table, per_block, sched, draft_kv)
        self.model = build_model(mc, config.model, config.revision).to(self.device)
        self.kv_caches = allocate_kv_cache(
            mc.num_layers,
            blocks,
            cache.block_size,
            mc.num_kv_heads,
            mc.head_dim,
            mc.dtype,
            self.device,
            mc.kv_cache_parts,
        )
        prefix_cache = PrefixCache(cache.block_size) if cache.enable_prefix_caching else None
        self.blocks = BlockManager(blocks, cache.block_size, prefix_cache, self.kv_caches)
        self.scheduler = Scheduler(sched, self.blocks)
        self.rope_switch: int | None = self.model.rotary.long_from  # LongRoPE's original context
        self.blocks.unshared_past = self.rope_switch
        if table is not None:  # SmoothGEMM's primitives and the fused MoE op are CPU code
            self.model.prepare_gemms(
                table, sched.max_num_batched_tokens, config.kernel_memory_budget, sched.max_num_seqs
            )
        self.runner = ModelRunner(self.model, self.kv_caches, cache.block_size)
        if self.spec is not None:
            self.spec.attach(self.model)
        release_free_heap()  # the holes loading and packing left in the heap are not steady memory
        self.stopper = StopChecker(self.tokenizer, mc.eos_token_ids, max_model_len)
        self.grammars = Grammars(self.tokenizer, mc.vocab_size, mc.eos_token_ids)
        self.role = config.role  # prefill: requests past their first token go to ``handoffs`` (engine/pd/)
        self.handoffs: list[Request] = []  # handed off, blocks still held until ``release`` (KV moved)
        self.requests: dict[str, Request] = {}  # every completion in flight, by its own id
        self.groups: dict[str, RequestGroup] = {}  # by the caller's request id
        self.num_steps = 0
        self.num_preemptions = 0
        self.last_stats: dict[str, Any] = {}
        self._expert_counts: list[np.ndarray] = []
        self._ids = itertools.count()
        self._closed = False
        logger.info(
            "engine: %s (%s, %s), %d KV blocks of %d tokens (%.3f GiB) + draft KV up to %.3f GiB",
            mc.name,
            mc.arch,
            dtype_name(mc.dtype),
            blocks,
            cache.block_size,
            blocks * per_block / (1 << 30),
            draft_kv / (1 << 30),
        )

    def _check_memory(
        self, table: GemmTable | None, per_block: int, sched: SchedulerConfig, draft_kv: int
    ) -> int:
        """Refuse, before allocating the model, one whose weights, kernel copies, draft (weights and its own
        KV, ``draft_kv``) and KV cache do not fit what the device has available (naming each); returns the
        KV cache's block count."""
        mc, config = self.model_config, self.config
        meta = meta_model(mc)
        weights = model_bytes(meta)
        copies = (
            0
            if table is None
            else meta.kernel_copy_bytes(
                table, sched.max_num_batched_tokens, config.kernel_memory_budget, sched.max_num_seqs
            )
        )
        spec = config.speculative_config
        draft = 0
        if spec is not None and spec.method == "draft_model":
            try:
                draft = weight_bytes(load_config(spec.model, dtype_name(mc.dtype))[0])
            except InputError as err:  # name the draft, so it is not taken for the target model
                raise InputError("speculative_config.model", f"draft model {spec.model}: {err}") from None
        need = MemoryNeed(weights=weights, kernel_copies=copies, draft=draft)
        available = free_memory(self.device)
        check_memory(need, available, "model")
        blocks = num_kv_blocks(
            config.cache,
            per_block,
            self.max_model_len,
            sched.max_num_seqs,
            available - need.total,
            reserved=draft_kv,
        )
        check_memory(replace(need, kv_cache=blocks * per_block + draft_kv), available, "model")
        return blocks

    @classmethod
    def from_args(cls, model: str, **engine_args: Any) -> Engine:
        """``Engine.from_args("dir", max_num_seqs=16, ...)`` with vLLM's engine argument names."""
        return cls(EngineConfig.from_args(model, **engine_args))

    # -- requests ---------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | PoolingParams | None = None,
        request_id: str | None = None,
        stream: bool = False,
        detokenize: bool = True,
        arrival: float | None = None,
    ) -> str:
        """Queue a prompt (text or token ids); returns its request id. Bad input raises InputError.

        ``stream``: ``step()`` reports this request's new tokens and text every step (deltas), not only
        its final output. ``detokenize=False``: outputs carry token ids and no text, and stop strings are
        the caller's to match (AsyncLLM's front door does both off this thread, and aborts a completion
        that reached one: ``abort(request_id, index)``). With PoolingParams the prompt only runs prefill
        and its output carries the ``embedding`` (pooling.py). ``arrival``: when the caller received it
        (``time.monotonic()``; default now), the start of its timeline (engine/timeline.py).
        """
        require(not self._closed, "engine", "is closed; create a new LLM / Engine to generate again")
        params = SamplingParams() if params is None else params
        pooling = params if isinstance(params, PoolingParams) else None
        if pooling is not None:
            params = SamplingParams(max_tokens=1)  # never sampled: it ends after its prompt
        mc = self.model_config
        require(
            pooling is not None or not mc.headless,
            "sampling_params",
            f"model {mc.name} ({mc.arch}) has no LM head: it serves embeddings only (PoolingParams, "
            "LLM.embed, /v1/embeddings)",
        )
        require(
            isinstance(params, SamplingParams), "sampling_params", "must be a SamplingParams or PoolingParams"
        )
        if request_id is None:
            request_id = next(i for i in map(str, self._ids) if i not in self.groups)
        request_id = str(request_id)
        ids = child_ids(request_id, params.n)
        require(
            request_id not in self.groups and not any(c in self.requests for c in ids),
            "request_id",
            f"{request_id!r} is already in use",
        )
        text = prompt if isinstance(prompt, str) else None
        token_ids = self._prompt_tokens(prompt)
        n = len(token_ids)
        if pooling is None:
            limit = self.max_model_len - 1
            require(
                n <= limit,
                "prompt",
                f"{n} tokens is too long: at most max_model_len - 1 = {limit} "
                f"(max_model_len={self.max_model_len}) so one token can be generated",
            )
        require(
            n <= self.max_model_len,
            "prompt",
            f"{n} tokens is too long: at most max_model_len = {self.max_model_len}",
        )
        vocab = self.model_config.vocab_size
        require(
            all(t < vocab for t in params.logit_bias or {}),
            "logit_bias",
            f"token ids must be in [0, {vocab - 1}] (vocab_size={vocab})",
        )
        require(
            all(t < vocab for t in params.stop_token_ids),
            "stop_token_ids",
            f"token ids must be in [0, {vocab - 1}] (vocab_size={vocab})",
        )
        spec = params.structured_outputs
        if spec is not None:  # a bad spec fails here, before anything changes (a cache hit if compiled)
            self.grammars.compile(spec)
        room = self.max_model_len - n
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        children = []
        for index, child_id in enumerate(ids):
            own = params if params.n == 1 else child_params(params, index)
            seed = self._seeds.getrandbits(64) if own.seed is None else own.seed
            child = Request(child_id, token_ids, own, max_tokens, prompt=text, seed=seed, arrival=arrival)
            child.parent_id, child.index, child.stream = request_id, index, stream
            child.matcher = None if spec is None else self.grammars.matcher(spec)
            child.pooling = pooling
            child.detokenize = detokenize
            self.stopper.start(child)
            self.requests[child_id] = child
            children.append(child)
        # With prefix caching the other completions wait for the first one's prompt KV, then share it.
        share = self.blocks.prefix_cache is not None and len(children) > 1
        group = RequestGroup(request_id, children, stream, held=children[1:] if share else [])
        self.groups[request_id] = group
        for child in children[: 1 if share else None]:
            self.scheduler.add(child)
        return request_id

    def _prompt_tokens(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            require(bool(prompt), "prompt", "must not be empty")
            token_ids = self.tokenizer.encode(prompt)  # InputError for text too long or not valid Unicode
        elif isinstance(prompt, (list, tuple)) and all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt
        ):
            token_ids = [int(t) for t in prompt]
        else:
            raise InputError("prompt", "must be a string or a list of token ids")
        require(len(token_ids) > 0, "prompt", "must not be empty")
        vocab = self.model_config.vocab_size
        require(
            min(token_ids) >= 0 and max(token_ids) < vocab,
            "prompt",
            f"token ids must be in [0, {vocab - 1}] (vocab_size={vocab})",
        )
        return token_ids

    def abort(self, request_id: str, index: int | None = None) -> bool:
        """Stop a request (all its n completions, or only completion ``index``) now and free its blocks;
        a request with nothing left running is forgotten (it reports nothing more). False if unknown or
        already finished."""
        group = self.groups.get(str(request_id))
        if group is None or group.finished:
            return False
        chosen = [c for c in group.children if index is None or c.index == index]
        for child in chosen:
            if not child.is_finished:
                self._finish(child, RequestStatus.FINISHED_ABORTED)
        group.held = [c for c in group.held if c not in chosen]
        if group.finished:
            self._forget(group)
        return True

    def set_role(self, role: str) -> None:
        """Change role between steps; weights, KV and requests stay. To "prefill": each running request is
        handed off after the next token it samples (its KV moves with it; each of n completions on its own),
        so in-flight work moves on to a decode engine; from "prefill": later requests decode here, those
        handed off already still move."""
        require(role in ROLES, "role", f"unknown {role!r}; allowed: {', '.join(ROLES)}")
        self.role = role

    def release(self, request: Request) -> None:
        """Free the blocks of a handed-off request (its KV has moved, or its transfer failed)."""
        self.handoffs.remove(request)
        self.blocks.free(request)

    def adopt(self, request: Request) -> None:
        """Continue a request handed over by another engine, its KV already in its blocks (engine/pd/)."""
        require(
            request.request_id not in self.groups, "request_id", f"{request.request_id!r} is already in use"
        )
        self.stopper.start(request)
        if request.text is not None:  # catch up on the tokens sampled there (stop strings, streaming)
            for token in request.output_token_ids:
                request.text.add(token)
        spec = request.params.structured_outputs
        if spec is not None:  # the grammar's state after those tokens (matchers do not travel)
            request.matcher = self.grammars.matcher(spec)
            for token in request.output_token_ids:
                request.matcher.accept_token(token)
        self.requests[request.request_id] = request
        self.groups[request.request_id] = RequestGroup(request.request_id, [request], request.stream)
        self.blocks.publish(request)  # the prompt's full blocks serve later prompts here too
        self.scheduler.resume(request)

    def _forget(self, group: RequestGroup) -> None:
        del self.groups[group.request_id]
        for child in group.children:
            del self.requests[child.request_id]

    @property
    def num_waiting(self) -> int:
        """Requests queued and not yet scheduled (the server's bound on waiting requests)."""
        return len(self.scheduler.waiting)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def output(self, request_id: str) -> RequestOutput:
        """The current output of a request, all n completions (final text once it has finished)."""
        return self.groups[str(request_id)].output(self.stopper)

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the final outputs of the requests that finished in it, and for
        streamed requests what each completion added in it (deltas; ``finished`` marks the last one).

        Finished requests are forgotten once returned; ``output(id)`` shows one still running.
        """
        if torch.get_num_threads() != self.config.num_threads:  # per calling thread; another engine may
            torch.set_num_threads(self.config.num_threads)  # have set its own in this one
        switches.use(self.config.switches)  # this engine's, should another in this process differ
        start = now()
        if self.spec is not None:  # drafts first, so verify work is scheduled with everything else
            self.spec.propose(self.scheduler.running, self.max_model_len, self.rope_switch)
        plan = self.scheduler.schedule()
        if self.spec is not None:
            for request in plan.preempted:
                self.spec.remove(request.request_id)
        if not plan.items:
            return []
        logits, hidden = self.runner.execute(plan.items)
        self._record_experts()
        touched: dict[str, list[Request]] = {}
        pooled = self._pool(plan.items, hidden)
        new_tokens = self._new_tokens(plan.items, logits)
        done = now()  # every token of this step is ready now (the requests' timelines)
        for item, tokens in zip(plan.items, new_tokens, strict=True):
            request = item.request
            if request in pooled:  # prompt-only work: done when its last chunk has run; its KV goes
                self.scheduler.advance(item, 0)
                if request.embedding is not None:
                    self._finish(request, RequestStatus.FINISHED_STOPPED)
                    touched.setdefault(request.parent_id, []).append(request)
                continue
            if isinstance(tokens, Exception):  # its own sampling failed: end it alone, with the reason
                request.error = f"sampling failed: {type(tokens).__name__}: {str(tokens)[:200]}"
                logger.warning("request %s: %s", request.request_id, request.error)
                self._finish(request, RequestStatus.FINISHED_ERROR)
                touched.setdefault(request.parent_id, []).append(request)
                continue
            self.scheduler.advance(item, len(tokens))
            before = request.num_tokens
            for token, logprobs in tokens:  # a verify may add several; stop checks run after each
                request.append_token(token, logprobs, done)
                if request.matcher is not None and not request.matcher.accept_token(token):
                    request.error = f"token {token} does not match the request's structured_outputs"
                    status: RequestStatus | None = RequestStatus.FINISHED_ERROR
                else:
                    status = self.stopper.check(request)
                    if status is None and request.matcher is not None and request.matcher.is_terminated():
                        status = RequestStatus.FINISHED_STOPPED  # the grammar is complete (ignore_eos too)
                if status is not None:
                    self.blocks.publish(request)  # its full blocks serve the next turn of a chat
                    self._finish(request, status)
                    break
            if tokens:
                touched.setdefault(request.parent_id, []).append(request)
            if not request.is_finished:
                if item.kind is WorkKind.VERIFY:  # rejected drafts: give back blocks past the kept tokens
                    self.blocks.truncate(request, request.num_tokens)
                self.blocks.publish(request)  # newly full blocks of verified tokens join the prefix cache
                switch = self.rope_switch
                if switch is not None and before <= switch < request.num_tokens:
                    # LongRoPE: past the original context every key rotates the long way (transformers
                    # drops its cache there and recomputes the whole sequence): so does this request.
                    self.scheduler.recompute(request)
                    if self.spec is not None:
                        self.spec.remove(request.request_id)
                elif tokens and self.role == "prefill":  # it sampled: a decode engine goes on (engine/pd/)
                    self.scheduler.hand_off(request)
                    self.handoffs.append(request)
                    if self.spec is not None:
                        self.spec.remove(request.request_id)
        if self.spec is not None:  # after the tokens are in: which rows are verified is known now
            self.spec.observe(plan.items, self.runner.hidden)
        finished = self._outputs(touched)
        self.num_steps += 1
        self.num_preemptions += len(plan.preempted)
        self.last_stats = {
            "step": self.num_steps,
            "tokens": plan.tokens_by_kind(),
            "num_seqs": len(plan.items),
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "preempted": len(plan.preempted),
            "kv_usage": self.blocks.usage,
            # monotonic: started (schedule), tokens sampled (the forward is done), outputs made
            "start": start,
            "sampled": done,
            "end": now(),
            "budget": plan.budget,
        }
        self.scheduler.budget.observe(plan.num_tokens, self.last_stats["end"] - start)
        if self.blocks.prefix_cache is not None:
            self.last_stats["prefix_hit_rate"] = self.blocks.prefix_cache.stats()["hit_rate"]
        if self.spec is not None:
            self.last_stats.update(self.spec.stats())
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "step %(step)d: tokens %(tokens)s, seqs %(num_seqs)d, running %(running)d, "
                "waiting %(waiting)d, preempted %(preempted)d, KV usage %(kv_usage).3f",
                self.last_stats,
            )
            logger.debug(
                "step %d: prefix hit rate %s, spec acceptance %s, mean accepted length %s",
                self.num_steps,
                *(
                    self.last_stats.get(k, "off")
                    for k in ("prefix_hit_rate", "spec_acceptance_rate", "spec_mean_accepted_len")
                ),
            )
        return finished

    def _outputs(self, touched: dict[str, list[Request]]) -> list[RequestOutput]:
        """Release waiting completions whose prompt is now cached; report deltas and finished groups."""
        outputs = []
        for parent_id, children in touched.items():
            group = self.groups[parent_id]
            if group.ready_to_release():
                for child in group.held:
                    self.scheduler.add(child)
                group.held = []
            if group.stream:
                outputs.append(group.output(self.stopper, delta_of=children))
            elif group.finished:
                outputs.append(group.output(self.stopper))
            if group.finished:
                self._forget(group)
        return outputs

    def _pool(self, items: list[WorkItem], hidden: torch.Tensor) -> set[Request]:
        """Fold the pooling requests' rows of this step into their embeddings; returns those requests."""
        rows = np.concatenate([[0], np.cumsum([it.num_tokens for it in items])[:-1]]).tolist()
        chosen = [i for i, it in enumerate(items) if it.request.pooling is not None]
        fold_chunks(hidden, [items[i] for i in chosen], [rows[i] for i in chosen])
        return {items[i].request for i in chosen}

    def _new_tokens(
        self, items: list[WorkItem], logits: torch.Tensor
    ) -> list[list[tuple[int, Any]] | Exception]:
        """(token, logprobs) pairs each item adds: none mid-prompt, one sampled, or a verify's kept tokens;
        or the error its request's sampling raised."""
        first = np.concatenate([[0], np.cumsum([it.num_logits for it in items])[:-1]]).tolist()
        out: list[list[tuple[int, Any]] | Exception] = [[] for _ in items]
        # Items that finish their pending tokens sample from their last logits row.
        plain = [
            i
            for i, it in enumerate(items)
            if it.kind is not WorkKind.VERIFY
            and it.start + it.num_tokens == it.request.num_tokens
            and it.request.pooling is None
        ]
        prompt = [
            i
            for i, it in enumerate(items)
            if it.request.prompt_logprobs is not None
            and it.kind is WorkKind.PREFILL
            and it.num_logits == it.num_tokens
        ]
        if prompt:
            chunks = [items[i] for i in prompt]
            record_prompt_logprobs(
                logits,
                [c.request for c in chunks],
                [c.start for c in chunks],
                [c.num_tokens for c in chunks],
                [first[i] for i in prompt],
            )
        if plain:
            reqs = [items[i].request for i in plain]
            last = [first[i] + items[i].num_logits - 1 for i in plain]
            rows = logits[torch.tensor(last)]

            def sample(idx: list[int]) -> list[list[tuple[int, Any]]]:
                return [[pair] for pair in self._sample_batch(rows[idx], [reqs[j] for j in idx])]

            for i, result in zip(plain, _isolated(sample, len(plain)), strict=True):
                out[i] = result
        verify = [i for i, it in enumerate(items) if it.kind is WorkKind.VERIFY]
        if verify:

            def check(idx: list[int]) -> list[list[tuple[int, Any]]]:
                chosen = [verify[j] for j in idx]
                kept = self.spec.verify(
                    [items[i].request for i in chosen],
                    logits,
                    [first[i] for i in chosen],
                    [items[i].num_logits for i in chosen],
                )
                return [[(t, None) for t in tokens] for tokens in kept]

            for i, result in zip(verify, _isolated(check, len(verify)), strict=True):
                out[i] = result
        return out

    def _sample_batch(self, rows: torch.Tensor, reqs: list[Request]) -> list[tuple[int, Any]]:
        rows = process_logits(rows, reqs, self.model_config.eos_token_ids)
        apply_bitmask(rows, decode_bitmask([r.matcher for r in reqs], rows.shape[1]))
        if not bool(rows.amax(dim=1).isfinite().all()):  # the max is NaN, +inf, or -inf when all are
            raise FloatingPointError("logits are NaN, +inf or all -inf after this request's processors")
        positions = [r.num_output_tokens for r in reqs]
        sampled = sample(rows, [r.params for r in reqs], [r.seed for r in reqs], positions)
        return list(zip(sampled.token_ids, sampled.logprobs, strict=True))

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.scheduler.finish(request, status)
        if self.spec is not None:
            self.spec.remove(request.request_id)
        request.finish_time = time.time()
        request.timeline.finished = now()

    def _record_experts(self) -> None:
        if self.config.record_expert_trace is None:
            return
        counts = self.model.expert_counts()
        if counts is not None:
            self._expert_counts.append(counts.cpu().numpy().astype(np.int64))

    # -- end --------------------------------------------------------------------------------------

    def expert_trace(self) -> ExpertTrace | None:
        """Tokens routed per expert for every recorded step so far (None when not recording)."""
        if self.config.record_expert_trace is None:
            return None
        mc, draft = self.model_config, self.model.draft_moe_layers
        counts = (
            np.stack(self._expert_counts)
            if self._expert_counts
            else np.zeros((0, mc.num_moe_layers + draft, mc.num_experts), dtype=np.int64)
        )
        meta = {
            "dtype": dtype_name(self.model_config.dtype),
            "seed": self.config.seed,
            "max_num_batched_tokens": self.scheduler.config.max_num_batched_tokens,
            "max_num_seqs": self.scheduler.config.max_num_seqs,
            "arch": mc.arch,
        }
        packed = expert_weight_bytes(self.model)
        if packed is not None:  # the simulator charges the packed bytes for expert reads and migrations
            meta["expert_weight_bytes"] = packed
        return ExpertTrace(counts, mc.name, mc.top_k, "engine", meta, draft_layers=draft)

    def close(self) -> None:
        """Abort what is left and write the expert trace (atomically) if one was asked for."""
        if self._closed:
            return
        self._closed = True
        for request in [r for r in self.requests.values() if not r.is_finished]:  # held ones too
            self._finish(request, RequestStatus.FINISHED_ABORTED)
        for request in list(self.handoffs):
            self.release(request)
        trace = self.expert_trace()
        if trace is not None:
            trace.save(self.config.record_expert_trace)
            logger.info("expert trace: %d steps -> %s", trace.num_steps, self.config.record_expert_trace)


def _isolated(run: Callable[[list[int]], list[T]], n: int) -> list[T | Exception]:
    """``run`` over rows 0..n-1 at once; if that raises, row by row, so only the rows that fail on their
    own (one request's parameters) get their error and the others keep their results."""
    try:
        return run(list(range(n)))
    except Exception as err:
        if n == 1:
            return [err]
    results: list[T | Exception] = []
    for row in range(n):
        try:
            results += run([row])
        except Exception as err:
            results.append(err)
    return results
