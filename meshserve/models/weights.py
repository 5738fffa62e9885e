"""Read safetensors checkpoints (one file or sharded with an index) into a DecoderLM built on the meta device.

Each file is memory-mapped and each parameter is allocated once, in the model's dtype and the layout its
kernel keeps (stacked experts column-major), then filled straight from the map: no random init, no float32
detour, no concatenated temporaries. The copy runs in chunks of at most CHUNK_BYTES of the file, and each
chunk's pages are dropped from the process (madvise) once copied, so a load's peak is the weights plus one
chunk, not the weights twice.

Checkpoints may hold tensors as Hugging Face names them (separate q/k/v, gate/up, one tensor per expert) or
already fused (transformers v5 stacked experts); `_parts` maps each of our parameters to the checkpoint
tensors that fill it and where each one goes.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from meshserve.errors import InputError
from meshserve.models.decoder import DecoderLM
from meshserve.models.layers.moe import StackedExperts
from meshserve.models.quant.load import fill_quantized

INDEX = "model.safetensors.index.json"
# safetensors dtype names: the ones we load, and the names of the rest for the error message.
WEIGHT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Integer tensors of packed quantized formats (GPTQ / AWQ): read as they are by Checkpoint.read.
PACKED_DTYPES = {
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I64": torch.int64,
}
OTHER_DTYPES = {"F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "BOOL": "bool"}
OTHER_DTYPES |= {f"{k}{b}": f"{n}{b}" for k, n in (("I", "int"), ("U", "uint")) for b in (8, 16, 32, 64)}
# Our fused tensors and the checkpoint tensors they concatenate (along dim 0).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
CHUNK_BYTES = 32 << 20  # file bytes resident at once while copying one tensor
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are and how to read them."""

    file: str
    dtype: str  # safetensors' name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    stop: int


def _read_header(path: Path, size: int) -> dict[str, Entry]:
    """The tensor table of one safetensors file (8-byte length, JSON header, then the data)."""
    with path.open("rb") as fh:
        raw = fh.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise ValueError("bad header length")
        header = json.loads(fh.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    base, entries = 8 + n, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, (start, stop) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        known = WEIGHT_DTYPES.get(dtype, PACKED_DTYPES.get(dtype))
        itemsize = None if known is None else known.itemsize
        if itemsize is not None and stop - start != math.prod(shape) * itemsize:
            raise ValueError(f"{key}: {stop - start} bytes for shape {list(shape)} of {dtype}")
        if not 0 <= start <= stop <= size - base:
            raise ValueError(f"{key}: data offsets past the end of the file")
        entries[key] = Entry(path.name, dtype, shape, base + start, base + stop)
    return entries


def _weight_files(path: Path) -> list[str]:
    index = path / INDEX
    if not index.exists():
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise InputError("weights", f"no *.safetensors file or {INDEX} in {path}")
        return files
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise InputError(INDEX, f"not a valid safetensors index ({err})") from None
    ok = isinstance(weight_map, dict) and all(
        isinstance(f, str) and f.endswith(".safetensors") and Path(f).name == f for f in weight_map.values()
    )
    if not ok or not weight_map:
        raise InputError(
            f"{INDEX}:weight_map", "must map tensor names to *.safetensors file names in the model directory"
        )
    files = sorted(set(weight_map.values()))
    for name in files:
        if not (path / name).is_file():
            raise InputError(name, f"listed in {INDEX} but missing from {path}")
    return files


class Checkpoint:
    """The tensors of every safetensors file of a model directory, memory-mapped (nothing read yet)."""

    def __init__(self, path: Path) -> None:
        self._maps: dict[str, mmap.mmap] = {}
        self._entries: dict[str, Entry] = {}
        for name in _weight_files(path):
            file = path / name
            try:
                size = file.stat().st_size
                self._entries.update(_read_header(file, size))
                with file.open("rb") as fh:  # private and copy-on-write: torch wants a writable buffer
                    self._maps[name] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as err:
                raise InputError(name, f"corrupt safetensors file ({err})") from None

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    @property
    def nbytes(self) -> int:
        return sum(e.stop - e.start for e in self._entries.values())

    def read(self, key: str) -> torch.Tensor:
        """Tensor `key` as stored (a quantized layer's packed integers, scales, zeros or g_idx), copied out of
        the map; float ones are refused when they hold NaN / inf."""
        e = self._entries[key]
        dtype = WEIGHT_DTYPES.get(e.dtype, PACKED_DTYPES.get(e.dtype))
        if dtype is None:
            raise InputError(
                f"{e.file}:{key}", f"dtype {OTHER_DTYPES.get(e.dtype, e.dtype)} is not supported here"
            )
        count = (e.stop - e.start) // dtype.itemsize
        out = (
            torch.frombuffer(self._maps[e.file], dtype=dtype, count=count, offset=e.start)
            .view(e.shape)
            .clone()
        )
        if dtype.is_floating_point and out.numel() and not bool(torch.isfinite(out).all()):
            raise InputError(f"{e.file}:{key}", "holds NaN or infinite values")
        return out

    def copy_into(self, key: str, dest: torch.Tensor) -> None:
        """Copy tensor `key` into `dest` (same shape, any dtype and strides), CHUNK_BYTES of the file at a
        time; refused when its dtype is not a float we load or it holds NaN / inf (in dest's dtype)."""
        e = self._entries[key]
        where = f"{e.file}:{key}"
        dtype = WEIGHT_DTYPES.get(e.dtype)
        if dtype is None:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in WEIGHT_DTYPES.values())
            name = OTHER_DTYPES.get(e.dtype, e.dtype)
            raise InputError(where, f"dtype {name} is not supported; allowed: {allowed}")
        rows = e.shape[0] if e.shape else 1
        row_bytes = (e.stop - e.start) // rows if rows else 0
        if row_bytes == 0:
            return
        dest = dest.view(1) if not e.shape else dest
        step = max(1, CHUNK_BYTES // row_bytes)
        buffer = self._maps[e.file]
        for r in range(0, rows, step):
            n = min(step, rows - r)
            start = e.start + r * row_bytes
            src = torch.frombuffer(buffer, dtype=dtype, count=n * row_bytes // dtype.itemsize, offset=start)
            out = dest[r : r + n]
            out.copy_(src.view(n, *e.shape[1:]))
            del src
            page = start - start % mmap.PAGESIZE  # madvise wants a page-aligned start
            buffer.madvise(mmap.MADV_DONTNEED, page, start + n * row_bytes - page)
            if not bool(
                torch.isfinite(torch.stack(torch.aminmax(out))).all()
            ):  # NaN and inf reach min or max
                raise InputError(where, f"holds NaN or infinite values (in {str(dest.dtype)[6:]})")


# One checkpoint tensor's place in our parameter: its key and the index into the parameter it fills.
Part = tuple[str, tuple[int | slice, ...]]


def _candidates(name: str, aliases: tuple[tuple[str, str], ...], prefix: str = "model.") -> list[str]:
    base = name if name.startswith("lm_head.") else prefix + name
    return [base] + [base.replace(ours, theirs) for ours, theirs in aliases if ours in base]


def _stacked(keys: list[str], ckpt: Checkpoint, lead: tuple[int, ...]) -> tuple[list[Part], int]:
    """Parts for `keys` concatenated along dim 0 (after the fixed `lead` index); and the rows they fill."""
    parts, row = [], 0
    for key in keys:
        rows = ckpt.shape(key)[0] if ckpt.shape(key) else 1
        parts.append((key, (*lead, slice(row, row + rows))))
        row += rows
    return parts, row


def _parts(name: str, ckpt: Checkpoint, model: DecoderLM) -> tuple[list[Part], list[int]] | None:
    """The checkpoint tensors that make up our parameter `name`, and the shape they make; None if absent."""
    gate, up, down = model.expert_names
    for key in _candidates(name, model.checkpoint_aliases, _prefix(model)):
        if key in ckpt:
            return [(key, ())], list(ckpt.shape(key))
        stem, _, leaf = key.rpartition(".")
        if stem.endswith(".experts") and leaf in ("gate_up_proj", "down_proj"):
            names = (gate, up) if leaf == "gate_up_proj" else (down,)
            parts, e, rows = [], 0, 0
            while all(f"{stem}.{e}.{p}.weight" in ckpt for p in names):
                keys = [f"{stem}.{e}.{p}.weight" for p in names]
                more, rows = _stacked(keys, ckpt, (e,))
                parts += more
                e += 1
            if parts:
                return parts, [e, rows, *ckpt.shape(parts[0][0])[1:]]
            continue
        owner, _, fused = stem.rpartition(".")
        keys = [f"{owner}.{p}.{leaf}" for p in {**FUSED, **model.fusions}.get(fused, ())]
        if keys and all(k in ckpt for k in keys):
            parts, rows = _stacked(keys, ckpt, ())
            return parts, [rows, *ckpt.shape(keys[0])[1:]]
    return None


def _missing_keys(name: str, ckpt: Checkpoint, model: DecoderLM) -> list[str]:
    """The checkpoint names we looked for under Hugging Face's classic naming and did not find."""
    key = _candidates(name, model.checkpoint_aliases, _prefix(model))[-1]
    stem, _, leaf = key.rpartition(".")
    owner, _, fused = stem.rpartition(".")
    if stem.endswith(".experts"):
        return [f"{stem}.<expert>.{leaf}.weight"]
    parts = [f"{owner}.{p}.{leaf}" for p in {**FUSED, **model.fusions}.get(fused, ())] or [key]
    return [p for p in parts if p not in ckpt]


def _prefix(model: DecoderLM) -> str:
    """A headless checkpoint (``LlamaModel``) names its tensors without the ``model.`` prefix."""
    return "" if model.config.headless else "model."


def _empty(module: nn.Module, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised storage for one parameter, in the layout its module's kernels keep."""
    if isinstance(module, StackedExperts):  # column-major per expert (StackedExperts.transposed_layout)
        return torch.empty(shape[0], shape[2], shape[1], dtype=dtype).transpose(1, 2)
    return torch.empty(shape, dtype=dtype)


def load_weights(model: DecoderLM, path: Path) -> None:
    """Give every parameter of `model` (built on the meta device by meta_model) its checkpoint values, in the
    dtype its meta parameter has.

    Every tensor is found and shape-checked before any memory is allocated; InputError names what is
    missing or wrong. Parameters shared by several modules (tied embeddings) stay shared.
    """
    ckpt = Checkpoint(path)
    plan, missing = {}, []
    for name, param in model.named_parameters():
        found = _parts(name, ckpt, model)
        if found is None:
            missing += _missing_keys(name, ckpt, model)
        elif found[1] != list(param.shape):
            raise InputError("weights", f"{name}: shape {found[1]}, expected {list(param.shape)}")
        else:
            plan[name] = found[0]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError("weights", f"missing tensors: {shown}")
    loaded: dict[int, nn.Parameter] = {}  # meta parameter id -> its loaded parameter
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            data = _empty(module, param.shape, param.dtype)  # the dtype meta_model gave it
            for key, index in plan[name]:
                ckpt.copy_into(key, data[index])
            loaded[id(param)] = nn.Parameter(data, requires_grad=False)
        qc = model.config.quantization
        if qc is not None:  # packed layers: buffers, filled from their own tensors (models/quant/load.py)
            fill_quantized(
                model,
                ckpt,
                qc,
                lambda n: _parts(n, ckpt, model),
                lambda n: _candidates(n, model.checkpoint_aliases, _prefix(model)),
                model.config.dtype,
            )
    for module in model.modules():  # every reference, tied ones included, to the loaded parameter
        for leaf, param in list(module._parameters.items()):
            if param is not None and id(param) in loaded:
                module._parameters[leaf] = loaded[id(param)]
        for leaf, buf in list(module._buffers.items()):  # non-persistent state (counters) starts at zero
            if buf is not None and buf.is_meta:
                module._buffers[leaf] = torch.zeros(buf.shape, dtype=buf.dtype)
