"""Read and validate preset data files (YAML under meshserve/wafer/presets/<kind>/)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from meshserve.errors import InputError

PRESET_DIR = Path(__file__).parent / "presets"


def preset_names(kind: str) -> list[str]:
    """Names of the presets of one kind ("hardware" or "models"), sorted."""
    return sorted(p.stem for p in (PRESET_DIR / kind).glob("*.yaml"))


def read_preset(kind: str, name_or_path: str, field: str) -> dict[str, Any]:
    """Load a preset by name, or a YAML file by path; unknown names raise InputError(field)."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PRESET_DIR / kind / f"{name_or_path}.yaml"
    if not path.is_file():
        allowed = ", ".join(preset_names(kind))
        raise InputError(field, f"unknown preset {name_or_path!r}; allowed: {allowed} (or a .yaml path)")
    data = read_yaml(path, field)
    if not isinstance(data, dict):
        raise InputError(field, f"{path.name} must hold a mapping of fields")
    return data


def read_yaml(path: Path, field: str) -> Any:
    """Parse a YAML file; bad YAML raises InputError(field) naming the file."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(field, f"{path.name} is not valid YAML: {err}") from None


# Keys any mapping may carry for people, never read by the simulator.
NOTES = ("name", "description")


class Section:
    """Typed access to one mapping of a preset, naming the full field path in every error.

    The schema is what the loader reads: every accessor records its key, and ``reject_unknown()``
    (called once the loader is done) refuses any other key, so a misspelt ``wafers:`` is an error,
    not a silent default, and a new field is allowed simply by reading it.
    """

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise InputError(where, "must be a mapping of fields")
        self.data = data
        self.where = where
        self.read: set[str] = set()
        self.children: list[Section] = []

    def has(self, key: str) -> bool:
        """Whether an optional key is there (it counts as known either way)."""
        self.read.add(key)
        return key in self.data

    def section(self, key: str) -> Section:
        self.read.add(key)
        if key not in self.data:
            raise InputError(f"{self.where}.{key}", "missing section")
        child = Section(self.data[key], f"{self.where}.{key}")
        self.children.append(child)
        return child

    def reject_unknown(self) -> None:
        """InputError naming the first key no accessor read, here or in a sub-section."""
        unknown = sorted(set(map(str, self.data)) - self.read - set(NOTES))
        if unknown:
            raise InputError(
                f"{self.where}.{unknown[0]}",
                f"unknown field (misspelt?); allowed here: {', '.join(sorted(self.read))}",
            )
        for child in self.children:
            child.reject_unknown()

    def number(self, key: str, *, positive: bool = True, default: float | None = None) -> float:
        """A finite real number; positive (> 0) unless positive=False, which allows >= 0."""
        field = f"{self.where}.{key}"
        self.read.add(key)
        value = self.data.get(key, default)
        if value is None:
            raise InputError(field, "missing; must be a number")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(field, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InputError(field, f"must be a finite number, got {value}")
        if positive and not value > 0:
            raise InputError(field, f"must be > 0, got {value}")
        if not positive and value < 0:
            raise InputError(field, f"must be >= 0, got {value}")
        return float(value)

    def integer(self, key: str, *, minimum: int = 1, default: int | None = None) -> int:
        field = f"{self.where}.{key}"
        self.read.add(key)
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InputError(field, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def boolean(self, key: str) -> bool:
        self.read.add(key)
        value = self.data.get(key)
        if not isinstance(value, bool):
            raise InputError(f"{self.where}.{key}", f"must be true or false, got {value!r}")
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        self.read.add(key)
        value = self.data.get(key)
        if value not in allowed:
            raise InputError(f"{self.where}.{key}", f"got {value!r}; allowed: {', '.join(allowed)}")
        return value
