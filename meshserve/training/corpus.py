"""The training text every machine has offline: the running CPython's standard library sources.

Files are split deterministically by a hash of their path relative to the stdlib root, so the same
Python version gives the same train / held-out split on any machine.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 (meshserve.testing's tiny models too)
BOS_ID, EOS_ID = 1, 2
HELD_OUT_PERCENT = 5


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every *.py under the stdlib (site-packages excluded), sorted by relative path."""
    root = root or stdlib_root()
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_held_out(relative: str) -> bool:
    """Deterministic split: crc32 of the relative path, HELD_OUT_PERCENT of files held out."""
    return zlib.crc32(relative.encode()) % 100 < HELD_OUT_PERCENT


def read_split(root: Path | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(train, held_out): relative path -> text, for files that decode as UTF-8."""
    root = root or stdlib_root()
    train: dict[str, str] = {}
    held: dict[str, str] = {}
    for path in stdlib_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately in other encodings
        rel = path.relative_to(root).as_posix()
        (held if is_held_out(rel) else train)[rel] = text
    return train, held


def read_held_out(root: Path | None = None) -> dict[str, str]:
    """Only the held-out files (relative path -> text): what prompts for evaluation come from."""
    root = root or stdlib_root()
    held = {}
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        if is_held_out(rel):
            try:
                held[rel] = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
    return held


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (256 byte tokens + <pad>/<s>/</s> + merges); prompts get <s> prepended."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tok
