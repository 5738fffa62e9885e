"""Where a new prompt goes among N prefill and M decode instances, and where its KV goes after.

The rule: the prompt goes to the instance taking prompts (every prefill instance, and a decode instance
switched to mixed) with the fewest queued prompt tokens, a prefill instance on a tie; when that is a
prefill instance, its KV goes to the decode instance with the most free KV blocks, the first on a tie.
Both counts are an instance's latest report (instance.py: every 0.25 s while busy, once on going idle)
plus what was routed to it since, so a burst of arrivals between two reports spreads out.
"""

from __future__ import annotations

from typing import Any


class Router:
    def __init__(self, kinds: dict[str, str], block_size: int) -> None:
        """``kinds``: each instance's own role ("prefill" or "decode"), in order."""
        self.kinds, self.block_size = kinds, block_size
        self.decoders = [name for name, kind in kinds.items() if kind == "decode"]
        self.reports: dict[str, dict[str, Any]] = {}
        self.tokens = dict.fromkeys(kinds, 0)  # prompt tokens routed since the latest report
        self.blocks = dict.fromkeys(kinds, 0)  # KV blocks routed since the latest report

    def report(self, name: str, stats: dict[str, Any]) -> None:
        """An instance's latest report: what was routed to it before is in its counts now."""
        self.reports[name] = stats
        self.tokens[name] = self.blocks[name] = 0

    def route(self, roles: dict[str, str], tokens: int) -> tuple[str, int | None]:
        """The instance a prompt of ``tokens`` goes to (``roles``: each one's role now), and the index in
        ``decoders`` of the one its KV goes to (None when a mixed decode instance takes the prompt)."""
        takers = [n for n, kind in self.kinds.items() if kind == "prefill" or roles[n] == "mixed"]
        name = min(takers, key=lambda n: (self._queued(n), self.kinds[n] != "prefill"))
        self.tokens[name] += tokens
        if self.kinds[name] != "prefill":
            return name, None
        free = [self._reported(d, "num_free_blocks") - self.blocks[d] for d in self.decoders]
        target = free.index(max(free))
        self.blocks[self.decoders[target]] += -(-tokens // self.block_size)
        return name, target

    def _queued(self, name: str) -> int:
        return self._reported(name, "queued_tokens") + self.tokens[name]

    def _reported(self, name: str, key: str) -> int:
        return self.reports.get(name, {}).get(key, 0)
