"""Token-budget hybrid scheduling: one function fills each step with decode, verify and prefill work.

Every step has ``max_num_batched_tokens`` tokens to hand out (XY-Serve's token-wise scheduling,
SplitFuse / chunked prefill), or fewer under a ``tpot_target_ms`` (token_budget.py: the step time
measured so far says how many tokens fit the target):

1. running requests that are generating get their tokens first: 1 for a decode, 1 + drafts for a
   verify (so time between tokens stays bounded);
2. running requests still in their prompt get the next chunk of it;
3. waiting requests are admitted in arrival order (FCFS) while budget, ``max_num_seqs`` and free
   blocks allow, each starting with a chunk of its prompt.

All of it runs as one flat batch in one forward. When blocks run out, the latest-arrived running
request is preempted (its KV dropped, recomputed later), so the oldest request always makes
progress and every request finishes.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field

from meshserve.config import SchedulerConfig
from meshserve.engine.kv_cache import BlockManager
from meshserve.engine.prompt_logprobs import wants_prompt_logits
from meshserve.engine.request import Request, RequestStatus
from meshserve.engine.timeline import now
from meshserve.engine.token_budget import TokenBudget


class WorkKind(enum.Enum):
    PREFILL = "prefill"  # a chunk of a prompt (or of a preempted request's tokens being recomputed)
    DECODE = "decode"  # the one token sampled last step
    VERIFY = "verify"  # the last sampled token plus draft tokens, all checked in one forward


@dataclass(slots=True)
class WorkItem:
    """Work for one request in one step: query tokens ``start .. start + num_tokens`` of it.

    num_logits: how many trailing rows need logits: 0 for a chunk that ends mid-prompt, 1 to sample
    the next token, 1 + drafts to verify.
    """

    request: Request
    kind: WorkKind
    start: int
    num_tokens: int
    num_logits: int


@dataclass
class SchedulerOutput:
    """One step's plan: the work items (one flat batch), the requests preempted to make room, and the
    token budget it was planned under."""

    items: list[WorkItem] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    budget: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)

    def tokens_by_kind(self) -> dict[str, int]:
        counts = {kind.value: 0 for kind in WorkKind}
        for item in self.items:
            counts[item.kind.value] += item.num_tokens
        return counts


def _by_arrival(request: Request) -> int:
    return request.arrival_order


class Scheduler:
    """Owns the waiting and running queues (both kept in arrival order) and the block manager."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.budget = TokenBudget(config.tpot_target_ms, config.max_num_batched_tokens)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        if request.timeline.queued is None:  # a preempted request keeps its first queue time
            request.timeline.queued = now()
        bisect.insort(self.waiting, request, key=_by_arrival)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Choose this step's work under the token budget (see the module docstring)."""
        budget = self.budget.tokens(len(self.running))
        out = SchedulerOutput(budget=budget)
        chosen: dict[Request, WorkItem] = {}
        # Generating requests first (False sorts first), then prompts in progress; each in arrival order.
        order = sorted(self.running, key=lambda r: (not self._generating(r), r.arrival_order))
        # Each generating request after the current one keeps 1 token of budget: drafts shrink first.
        generating_after = sum(map(self._generating, order))
        for request in order:
            if budget == 0:
                break
            generating_after -= self._generating(request)
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            while True:
                item = self._work(request, budget, shrink=True, reserve=generating_after)
                if self.blocks.allocate(request, item.start + item.num_tokens):
                    chosen[request] = item
                    budget -= item.num_tokens
                    break
                victim = self.running[-1]  # the latest arrival gives way
                self._preempt(victim, out)
                if victim in chosen:
                    budget += chosen.pop(victim).num_tokens
                if victim is request:
                    break

        # New work only when nothing had to be preempted: there is no room to spare this step.
        while not out.preempted and self.waiting and budget > 0:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            reused = self.blocks.match_prefix(request, budget)  # cached prefix blocks (APC): KV computed
            if reused is None:
                break  # would not fit: nothing taken, no copy made; strict FCFS, so no one overtakes it
            item = self._work(request, budget, shrink=False)
            if not self.blocks.allocate(request, item.start + item.num_tokens):
                self.blocks.free(request)  # give the shared prefix back; matched again next step
                request.num_computed_tokens = 0
                break  # strict FCFS: later arrivals do not overtake the head of the queue
            self.blocks.record_prefix(request, reused)
            self.waiting.pop(0)
            request.status = RequestStatus.RUNNING
            if request.timeline.scheduled is None:
                request.timeline.scheduled = now()
            bisect.insort(self.running, request, key=_by_arrival)
            chosen[request] = item
            budget -= item.num_tokens

        out.items = list(chosen.values())
        return out

    def advance(self, item: WorkItem, num_new_tokens: int) -> None:
        """After the forward: the item's tokens now have KV. A verify keeps only the accepted ones."""
        request = item.request
        if item.kind is WorkKind.VERIFY:
            # KV is kept for the last token plus the accepted drafts: one fewer than the new tokens.
            request.num_computed_tokens = item.start + num_new_tokens
        else:
            request.num_computed_tokens = item.start + item.num_tokens
        request.spec_token_ids = []

    def recompute(self, request: Request) -> None:
        """Drop a running request's KV and queue it to compute all its tokens again (LongRoPE's switch to
        the long factors, which transformers makes by dropping its cache)."""
        self.running.remove(request)
        self.blocks.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        self.add(request)

    def hand_off(self, request: Request) -> None:
        """A running request leaves this scheduler (prefill role) with its blocks still held: they are freed
        once its KV has moved (engine/pd/)."""
        self.running.remove(request)
        request.status = RequestStatus.HANDED_OFF

    def resume(self, request: Request) -> None:
        """Run a request whose KV is already in its blocks (handed over by a prefill engine)."""
        request.status = RequestStatus.RUNNING
        bisect.insort(self.running, request, key=_by_arrival)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request (stop, length or abort) and free its blocks at once (a NEW one is in no queue)."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.blocks.free(request)
        request.status = status

    def _generating(self, request: Request) -> bool:
        """Past its prompt: needs one token (decode) or one plus drafts (verify) this step."""
        return request.num_output_tokens > 0 and request.num_tokens - request.num_computed_tokens == 1

    def _work(self, request: Request, budget: int, shrink: bool, reserve: int = 0) -> WorkItem:
        """The largest piece of the request's pending work that fits in ``budget`` tokens.

        With ``shrink``, a prompt chunk also shrinks to the free KV space rather than evict anyone.
        ``reserve``: budget tokens a verify leaves for the decodes scheduled after it.
        """
        start = request.num_computed_tokens
        pending = request.num_tokens - start
        if pending == 1 and request.num_output_tokens > 0:
            drafts = min(len(request.spec_token_ids), budget - 1 - reserve)  # the rest wait for a later step
            if drafts > 0:
                return WorkItem(request, WorkKind.VERIFY, start, 1 + drafts, 1 + drafts)
            return WorkItem(request, WorkKind.DECODE, start, 1, 1)
        n = min(pending, budget)
        if shrink:
            room = self.blocks.capacity(request) - start
            if room > 0:
                n = min(n, room)
        # A pooling request never samples: its hidden rows are read, not its logits.
        num_logits = n if wants_prompt_logits(request) else int(n == pending and request.pooling is None)
        return WorkItem(request, WorkKind.PREFILL, start, n, num_logits)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Drop the request's KV and send it back to the waiting queue (it will be recomputed)."""
        self.running.remove(request)
        self.blocks.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.add(request)
        out.preempted.append(request)
