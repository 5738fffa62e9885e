"""A sentence-transformers checkpoint's pooling (modules.json, 1_Pooling/config.json), read as vLLM does.

The engine's embeddings default to what the checkpoint declares; a plain causal LM declares nothing and
gets the engine's default (LAST, normalized).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from meshserve.errors import InputError, require

# 1_Pooling/config.json's flags and the pooling each means
MODES = {
    "pooling_mode_lasttoken": "LAST",
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_cls_token": "CLS",
}


def read_pooling(model_dir: Path) -> dict[str, Any]:
    """{"pooling_type", "normalize"} from a sentence-transformers module list; {} when there is none."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return {}
    try:
        modules = json.loads(modules_file.read_text())
        paths = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise InputError("modules.json", f"not a sentence-transformers module list ({err})") from None
    pooling_type = "LAST"
    config_file = model_dir / paths.get("Pooling", "1_Pooling") / "config.json"
    if "Pooling" in paths and config_file.is_file():
        field = str(config_file.relative_to(model_dir))
        try:
            flags = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(field, f"invalid JSON ({err})") from None
        chosen = [kind for flag, kind in MODES.items() if isinstance(flags, dict) and flags.get(flag)]
        require(len(chosen) <= 1, field, f"one pooling mode at a time is supported, got {chosen}")
        pooling_type = chosen[0] if chosen else pooling_type
    return {"pooling_type": pooling_type, "normalize": "Normalize" in paths}
