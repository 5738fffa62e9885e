"""Model ids ("Org/Name") -> a snapshot directory in the local Hugging Face cache. Nothing is downloaded.

The cache layout is huggingface_hub's: ``<cache>/models--Org--Name/refs/<branch or tag>`` holds a commit
hash and ``snapshots/<hash>/`` the files. The cache is ``HF_HUB_CACHE`` (or the older
``HUGGINGFACE_HUB_CACHE``), else ``HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub`` (default
``~/.cache``), read at call time. A local directory always wins over an id of the same spelling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from meshserve.errors import InputError

MODEL_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # Org/Name, as the Hub spells repository ids
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_cache() -> Path:
    """The Hugging Face hub cache directory this process would use (from the environment)."""
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if hub:
        return Path(hub).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def resolve_model(model: str | Path, revision: str | None = None) -> Path:
    """The directory of `model`: itself when it is one, else its snapshot at `revision` (default "main") in
    the local cache. InputError says where it looked when neither exists."""
    path = Path(model).expanduser()
    if path.is_dir() and revision is None:
        return path
    if not MODEL_ID.match(str(model)) or path.is_dir():
        field = "revision" if revision is not None else "model"
        why = "applies to a Hugging Face model id (Org/Name) only" if revision else "is not a directory"
        raise InputError(field, f"{model} {why}")
    revision = revision or "main"
    repo = hub_cache() / f"models--{str(model).replace('/', '--')}"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    if COMMIT.match(commit) and snapshot.is_dir():
        return snapshot
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
    raise InputError(
        "model",
        f"{model} is not a directory, nor in the local Hugging Face cache at revision {revision!r}: looked "
        f"for {ref} and {repo / 'snapshots'}/<commit>{offline}. meshserve downloads nothing; fetch it "
        f"with `huggingface-cli download {model}` or pass a model directory",
    )
