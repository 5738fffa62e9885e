"""Make a draft model from a target by keeping only its first layers (self-speculative / layer skipping).

The draft shares the target's tokenizer, embeddings, final norm and LM head, so its next-token guesses
track the target's far better than an unrelated small model would (random test models have no trained
small sibling). The result is an ordinary Hugging Face-format directory.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from meshserve.atomic import atomic_path
from meshserve.errors import InputError, require

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def write_layer_skip_draft(target: str | Path, path: str | Path, num_layers: int) -> Path:
    """Write to ``path`` a copy of ``target`` with only its first ``num_layers`` decoder layers."""
    target, path = Path(target), Path(path)
    config_file = target / "config.json"
    require(config_file.is_file(), "model", f"no config.json in {target}")
    config = json.loads(config_file.read_text())
    total = int(config.get("num_hidden_layers", 0))
    require(1 <= num_layers <= total, "num_layers", f"must be in [1, {total}], got {num_layers}")
    files = sorted(target.glob("*.safetensors"))
    if not files:
        raise InputError("weights", f"no *.safetensors file in {target}")
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                layer = _LAYER.search(name)
                if layer is None or int(layer.group(1)) < num_layers:
                    tensors[name] = handle.get_tensor(name)
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config["num_hidden_layers"] = num_layers
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in _COPIED:
        if (target / name).is_file():
            shutil.copyfile(target / name, path / name)
    return path
