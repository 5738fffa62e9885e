"""Expert-parallel MoE: each rank routes its own tokens, sends every token-expert pair to one replica of
its expert (all-to-all dispatch), runs the experts it holds, and gets the results back (all-to-all
combine). Transport is torch.distributed's ``all_to_all_single`` with split sizes.

The layer wraps a SparseMoE: the router, the shared expert and the final weighted sum are the same
code and the same float operations as the single-process layer, and the held experts run through
SparseMoE's own grouped GEMMs (``SlotExperts``; quantized experts through ``quant_moe`` on their packed
slots, quant_slots.py), so outputs match the single-process engine. A rank
with no tokens still calls ``forward`` on an empty batch: the all-to-alls need every rank.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from meshserve.kernels.fused_moe import fused_moe, pack_experts
from meshserve.models.layers.moe import SparseMoE, StackedExperts
from meshserve.models.layers.quant_experts import QuantExperts
from meshserve.models.layers.quant_slots import QuantSlotExperts


class Placement(Protocol):
    """What dispatch needs from a placement (engine/distributed/expert_map.py's ExpertMap)."""

    slot_of: torch.Tensor
    replicated: np.ndarray  # [moe_layer] bool: the layer has an expert with several replicas

    def destinations(self, layer: int, experts: torch.Tensor, rank: int) -> torch.Tensor: ...

    def balanced_destinations(
        self, layer: int, experts: torch.Tensor, rank: int, counts: torch.Tensor
    ) -> torch.Tensor: ...


class SlotExperts(SparseMoE):
    """The experts one rank holds, as slots; rows arrive already routed (one slot each, weight 1).

    Where the fused MoE op runs (``packed`` given) the slots hold only its packed copy, and migration copies
    that copy; otherwise they hold the stacked weights and run the batched matmuls.
    """

    native_router = False  # routing is given (`route` below)

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        packed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        with torch.device("meta"):  # the weights are given: build without allocating any
            super().__init__(
                hidden_size,
                intermediate_size,
                len(gate_up),
                1,
                renormalize=False,
                weights_in_model_dtype=True,
            )
        del self.gate  # routing is given
        self.last_counts = torch.zeros(len(gate_up), dtype=torch.long, device=gate_up.device)
        self.experts.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        self.experts.down_proj = nn.Parameter(down, requires_grad=False)
        if packed is None:
            self.experts.transposed_layout()  # copies only weights not already in that layout
        else:
            self.experts.packed = packed
        self._slot = torch.zeros(0, dtype=torch.long, device=gate_up.device)

    @classmethod
    def empty(
        cls,
        hidden_size: int,
        intermediate_size: int,
        slots: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        packed: bool = False,
    ) -> SlotExperts:
        """``slots`` experts with uninitialised weights, allocated in the layout they run in (packed, or
        stacked and transposed), so building them copies nothing; a live migration fills them in place
        through ``parts``."""
        i, h = intermediate_size, hidden_size
        shapes = ((slots, h, 2 * i), (slots, i, h))
        if packed:
            meta = [torch.empty(s, dtype=dtype, device="meta").transpose(1, 2) for s in shapes]
            blocks = tuple(torch.empty(p.shape, dtype=dtype, device=device) for p in pack_experts(*meta))
            return cls(h, i, *meta, packed=blocks)
        return cls(h, i, *(torch.empty(s, dtype=dtype, device=device).transpose(1, 2) for s in shapes))

    @classmethod
    def held(cls, experts: StackedExperts, index: torch.Tensor) -> SlotExperts:
        """The experts ``index`` of a (prepared) StackedExperts, copied in the layout they run in."""
        down = experts.down_proj
        h, i = down.shape[1], down.shape[2]
        if experts.packed is None:
            return cls(h, i, experts.gate_up_proj[index], down[index])
        meta = [
            torch.empty(len(index), *w.shape[1:], dtype=w.dtype, device="meta")
            for w in (experts.gate_up_proj, down)
        ]
        return cls(h, i, *meta, packed=tuple(p[index] for p in experts.packed))

    def like(self, slots: int) -> SlotExperts:
        """``slots`` uninitialised slots of this layout (``empty``)."""
        down, packed = self.experts.down_proj, self.experts.packed
        device = (down if packed is None else packed[0]).device  # a packed layer's stacked weights are meta
        return SlotExperts.empty(down.shape[1], down.shape[2], slots, down.dtype, device, packed is not None)

    @property
    def element_size(self) -> int:
        """Bytes per element of ``parts``."""
        return self.experts.down_proj.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.experts.packed
        if packed is None:
            return super().forward(x)
        return fused_moe(x, self._slot[:, None], x.new_ones(len(x), 1, dtype=torch.float32), packed)

    def run(self, rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Expert output of each row [R, H] through its slot [R]."""
        self._slot = slot
        return self(rows)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.new_ones(len(x), 1), self._slot[:, None]

    def part_sizes(self) -> list[int]:
        """Elements of each of one slot's parts (what ``parts`` returns)."""
        weights = self.experts.packed or (self.experts.gate_up_proj, self.experts.down_proj)
        return [math.prod(w.shape[1:]) for w in weights]

    def parts(self, slot: int) -> list[torch.Tensor]:
        """One slot's weights as flat views of the slot, not copies: what a migration sends and writes. The
        packed blocks of the slot, or each stacked weight's transpose row by row (its storage order)."""
        if self.experts.packed is not None:
            return [p[slot].view(-1) for p in self.experts.packed]
        weights = (self.experts.gate_up_proj, self.experts.down_proj)
        return [w.detach()[slot].transpose(0, 1).contiguous().view(-1) for w in weights]


class ExpertParallelMoE(nn.Module):
    """A SparseMoE whose routed experts live on several ranks; ``layer`` indexes the MoE layers.

    ``dispatch``: ``even`` sends each pair to a replica without communication; ``balanced`` all-gathers
    the step's per-expert counts first and levels the replicas' loads (engine/distributed/balanced.py).
    """

    def __init__(
        self,
        moe: SparseMoE,
        layer: int,
        placement: Placement,
        held: np.ndarray,
        rank: int,
        group: dist.ProcessGroup | None = None,
        dispatch: str = "even",
    ) -> None:
        super().__init__()
        self.moe, self.layer, self.rank, self.group = moe, layer, rank, group
        self.dispatch = dispatch
        self.placement = placement
        experts, index = moe.experts, torch.from_numpy(held)
        if isinstance(experts, QuantExperts):  # held in their packed form
            self.local: SlotExperts | QuantSlotExperts = QuantSlotExperts.held(experts, index)
            self.hidden_size, self.intermediate_size = self.local.hidden_size, self.local.intermediate_size
        else:
            self.intermediate_size = experts.down_proj.shape[2]
            self.hidden_size = experts.down_proj.shape[1]
            self.local = SlotExperts.held(experts, index)
        moe.experts = None  # this rank keeps only the experts it holds
        self.last_received = 0  # pairs this rank's experts computed in the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, hidden = x.shape
        k = self.moe.top_k
        weights, experts = self.moe.route(x)
        pair_expert = experts.reshape(-1)  # pair p = token p // k, choice p % k
        self.moe.last_counts = torch.bincount(pair_expert, minlength=self.moe.num_experts)

        if self.dispatch == "balanced" and self.placement.replicated[self.layer]:
            counts = self._gather(self.moe.last_counts)
            dest = self.placement.balanced_destinations(self.layer, pair_expert, self.rank, counts)
        else:
            dest = self.placement.destinations(self.layer, pair_expert, self.rank)
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=self.placement.slot_of.shape[2])
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        self.last_received = sum(recv)
        rows = self._exchange(x[order // k], recv, send)
        row_expert = self._exchange(pair_expert[order], recv, send)

        slot = self.placement.slot_of[self.layer, row_expert, self.rank]
        back = self._exchange(self.local.run(rows, slot), send, recv)
        pair_out = x.new_empty(order.numel(), hidden)
        pair_out[order] = back
        out = (pair_out.view(t, k, hidden) * weights[..., None]).sum(dim=1).to(x.dtype)
        shared = self.moe.shared_output(x)  # every rank holds the shared expert
        return out if shared is None else out + shared

    def _gather(self, counts: torch.Tensor) -> torch.Tensor:
        """Every rank's ``counts`` [experts] as [ranks, experts] (one all-gather)."""
        out = [torch.empty_like(counts) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(out, counts.contiguous(), group=self.group)  # gloo has no all_gather_into_tensor
        return torch.stack(out)

    def _exchange(self, data: torch.Tensor, recv: list[int], send: list[int]) -> torch.Tensor:
        """all_to_all_single of rows: ``send[r]`` rows to rank r, ``recv[r]`` rows from rank r."""
        out = data.new_empty(sum(recv), *data.shape[1:])
        dist.all_to_all_single(out, data.contiguous(), recv, send, group=self.group)
        return out
