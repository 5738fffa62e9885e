"""One caller request's completions gathered from the instances that end them, merged into the outputs one
engine would return.

With ``n`` > 1 the prefill instance runs the n completions as a mixed engine does (the first one's prompt
KV shared by the others through its prefix cache) and hands each off on its own; the decode instance
continues each as a request of its own (``child_ids``), its prompt blocks received once and shared through
its prefix cache. A completion that ends at its first token ends on the prefill instance. Here they meet
again: a streamed request's deltas pass through under the caller's id; any other returns once, when all
n have ended.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from meshserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput


@dataclass
class Pending:
    request_id: str
    n: int
    stream: bool
    done: dict[int, CompletionOutput] = field(default_factory=dict)  # ended completions, by index

    @property
    def finished(self) -> bool:
        return len(self.done) == self.n

    def take(self, out: RequestOutput) -> RequestOutput | None:
        """What to return for an instance's output ``out``: the delta (streamed), the merged final output
        once every completion has ended, else None."""
        for completion in out.outputs:
            if completion.finish_reason is not None:
                self.done[completion.index] = completion
        if self.stream:
            return dataclasses.replace(out, request_id=self.request_id, finished=self.finished)
        if not self.finished:
            return None
        outputs = [self.done[i] for i in range(self.n)]
        return dataclasses.replace(out, request_id=self.request_id, outputs=outputs, finished=True)

    def end(self, index: int | None, reason: str, error: str | None = None) -> RequestOutput | None:
        """End completion ``index`` (None: every one not ended yet) with ``reason``; the output to return
        once that ends the request (for a streamed one, only the completions ended now)."""
        ended = [i for i in range(self.n) if i not in self.done and index in (None, i)]
        for i in ended:
            self.done[i] = CompletionOutput(i, "", [], reason, error=error)
        if not self.finished:
            return None
        chosen = ended if self.stream else range(self.n)
        metrics = RequestMetrics(time.time(), None, time.time())
        return RequestOutput(self.request_id, None, [], [self.done[i] for i in chosen], True, metrics)
