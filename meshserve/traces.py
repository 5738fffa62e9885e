"""Expert-load traces: the one format the serving engine writes and the wafer simulator replays.

A trace holds, for every recorded step and MoE layer, how many tokens the router sent to each
expert: ``counts[step, layer, expert]`` (int64, >= 0). The last ``draft_layers`` layers, if any, are a
speculative draft's own MoE (DeepSeek-V3's MTP layer): their tokens are drafts, not served tokens, so
`target()` drops them for a simulator of the served model. Metadata says where it came from. It is
stored as a single ``.npz`` file (``counts`` + ``meta`` as JSON) and written atomically, so a
crashed writer never leaves half a file. See docs/traces.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meshserve.atomic import atomic_path
from meshserve.errors import InputError

FORMAT_VERSION = 1
# What numpy, zipfile and zlib raise on a truncated, corrupted or foreign file (zipfile raises
# RuntimeError for a member whose flags say encrypted: one flipped bit).
DAMAGED = (
    OSError,
    ValueError,
    TypeError,
    AttributeError,
    EOFError,
    RuntimeError,
    zipfile.BadZipFile,
    zlib.error,
)


@dataclass(frozen=True)
class ExpertTrace:
    """Tokens routed to each expert, per step and MoE layer.

    counts: int64 array [steps, layers, experts]; a token routed top-k counts k times per layer.
    model: model name the trace belongs to (a preset name, or the HF model directory's name).
    top_k: experts per token, so tokens per step = counts[s, l].sum() / top_k.
    source: who made it, e.g. "engine" or "synthetic:fixed".
    meta: anything else worth keeping (seed, generator parameters, engine settings).
    draft_layers: how many of the last layers are a speculative draft's MoE layers, after the model's own
      (a step's row there sums every draft forward that proposed the tokens the step verified).
    """

    counts: np.ndarray
    model: str
    top_k: int
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    draft_layers: int = 0

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts)
        if counts.ndim != 3:
            raise InputError("counts", f"must have shape [steps, layers, experts], got {counts.shape}")
        if counts.size and (not np.issubdtype(counts.dtype, np.integer) or counts.min() < 0):
            raise InputError("counts", "must be non-negative integers")
        if self.top_k < 1 or self.top_k > max(counts.shape[2], 1):
            raise InputError("top_k", f"must be in [1, {counts.shape[2]}] (experts), got {self.top_k}")
        layers = counts.shape[1]
        if isinstance(self.draft_layers, bool) or not isinstance(self.draft_layers, int):
            raise InputError("draft_layers", f"must be an integer, got {self.draft_layers!r}")
        if not 0 <= self.draft_layers < max(layers, 1):
            raise InputError(
                "draft_layers",
                f"must be in [0, {max(layers - 1, 0)}] ({layers} layers), got {self.draft_layers}",
            )
        object.__setattr__(self, "counts", counts.astype(np.int64, copy=False))

    @property
    def num_steps(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.counts.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[2])

    def target(self) -> ExpertTrace:
        """The trace of the served model's own layers: the draft layers dropped."""
        if not self.draft_layers:
            return self
        return dataclasses.replace(self, counts=self.counts[:, : -self.draft_layers], draft_layers=0)

    def tokens_per_step(self) -> np.ndarray:
        """Tokens served per step (float: mean over the model's own layers of counts / top_k)."""
        return self.target().counts.sum(axis=2).mean(axis=1) / self.top_k

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically to ``path`` (.npz); returns the path written."""
        path = Path(path)
        header = {
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "top_k": self.top_k,
            "source": self.source,
            "meta": self.meta,
            "draft_layers": self.draft_layers,
        }
        with atomic_path(path) as tmp, tmp.open("wb") as fh:  # a file handle: savez adds no suffix
            np.savez_compressed(fh, counts=self.counts, meta=np.array(json.dumps(header)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExpertTrace:
        """Read a trace written by :meth:`save`; a bad file raises InputError("trace FILE", why)."""
        path = Path(path)
        field = f"trace {path}"
        if not path.is_file():
            raise InputError(field, "no such file")
        try:
            with np.load(path, allow_pickle=False) as data:
                counts = data["counts"]
                header = json.loads(str(data["meta"]))
            if not isinstance(header, dict):
                raise InputError("meta", "must be a JSON object")
            version = header.get("format_version")
            if version != FORMAT_VERSION:
                raise InputError("format_version", f"{version!r}; this meshserve reads {FORMAT_VERSION}")
            top_k = header["top_k"]
            if isinstance(top_k, bool) or not isinstance(top_k, int):
                raise InputError("top_k", f"must be an integer, got {top_k!r}")
            return cls(
                counts=counts,
                model=str(header["model"]),
                top_k=top_k,
                source=str(header["source"]),
                meta=header.get("meta", {}),
                draft_layers=header.get("draft_layers", 0),  # absent before draft layers were recorded
            )
        except InputError as err:
            raise InputError(field, str(err)) from None
        except KeyError as err:
            raise InputError(field, f"not a meshserve expert trace (missing {err})") from None
        except DAMAGED as err:
            raise InputError(field, f"not a meshserve expert trace, or damaged ({err})") from None
