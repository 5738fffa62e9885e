"""NI-Balancer's migration steps (MoEntwine); its trigger and planner live in meshserve.placement.ni.

Migration: a copy a -> b is split into steps ``a -> a'`` (local, inside a's FTD), ``a' -> b'``
(global, between FTDs) and ``b' -> b`` (local, inside b's FTD); a' is a's FTD member nearest b,
b' is b's FTD member nearest a'. Local steps ride idle link time of the attention all-reduce
(all-to-all keeps intra-FTD links busy), global steps ride idle link time of the MoE all-to-all
(which never leaves an FTD under ER-Mapping). The simulator sends them in chunks that fit
those windows, so inference never waits; the new placement switches in once all copies landed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshserve.placement import Migrations

LOCAL, GLOBAL = 0, 1


@dataclass(frozen=True)
class MigrationSteps:
    """Copies split into ordered steps: step ``i`` of a copy may start once step ``i-1`` is done.

    copy: index of the copy in its Migrations; order: 0, 1, 2 within the copy; phase: LOCAL or
    GLOBAL; src, dst: devices.
    """

    copy: np.ndarray
    order: np.ndarray
    phase: np.ndarray
    src: np.ndarray
    dst: np.ndarray

    def __len__(self) -> int:
        return int(self.copy.size)


def split_steps(moves: Migrations, ftd: np.ndarray, hops: np.ndarray) -> MigrationSteps:
    """Split each copy a -> b into local / global / local steps along FTD boundaries."""
    ftd = np.asarray(ftd)
    hops = np.asarray(hops, dtype=np.float64)
    a, b = moves.src, moves.dst
    same = ftd[None, :] == ftd[a][:, None]  # [copies, devices]: members of a's FTD
    a_exit = np.where(same, hops[:, b].T, np.inf).argmin(axis=1) if len(a) else a
    same_b = ftd[None, :] == ftd[b][:, None]
    b_entry = np.where(same_b, hops[a_exit], np.inf).argmin(axis=1) if len(a) else b
    inside = ftd[a] == ftd[b]
    legs = [
        (a, np.where(inside, b, a_exit), np.full(len(a), LOCAL)),
        (a_exit, b_entry, np.full(len(a), GLOBAL)),
        (b_entry, b, np.full(len(a), LOCAL)),
    ]
    keep = [np.ones(len(a), bool), ~inside, ~inside]
    parts = []
    for i, ((src, dst, phase), k) in enumerate(zip(legs, keep, strict=True)):
        k = k & (src != dst)
        copy = np.nonzero(k)[0]
        parts.append((copy, np.full(copy.size, i), phase[k], src[k], dst[k]))
    cat = [np.concatenate(x) for x in zip(*parts, strict=True)]
    order = np.lexsort((cat[1], cat[0]))
    return MigrationSteps(*(x[order] for x in cat))
