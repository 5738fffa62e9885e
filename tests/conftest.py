"""Shared test settings. pytest-xdist runs one worker per core, so each worker keeps to one thread."""

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Engines in tests run the shipped or stand-in GEMM table: no first-use profile (tests time nothing), and
# no profile from this user's cache (tests see the same tables on every machine of a kind).
os.environ.setdefault("MESHSERVE_PROFILE", "off")
os.environ.setdefault("MESHSERVE_PROFILE_DIR", tempfile.mkdtemp(prefix="meshserve-test-profiles-"))


# Imports after the environment settings above, so torch starts with one thread.
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Tests never time anything (benchmarks do): no hypothesis deadline, which a loaded CI core can miss.
settings.register_profile("meshserve", deadline=None)
settings.load_profile("meshserve")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_model_dir(arch, **overrides) -> a make_tiny_model directory, made once per worker."""
    from meshserve.testing import make_tiny_model

    made: dict[tuple, Path] = {}

    def make(arch: str = "llama", **overrides) -> Path:
        key = (arch, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in made:
            made[key] = make_tiny_model(tmp_path_factory.mktemp(arch), arch=arch, **overrides)
        return made[key]

    return make


@pytest.fixture(autouse=True)
def switches_from_the_environment() -> None:
    """Each test starts with no switches installed, so the first read takes that test's environment (an
    engine installs its own; `switch` below changes one mid-test)."""
    from meshserve import switches

    switches.use(None)
    yield
    switches.use(None)


@pytest.fixture
def switch(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str | None], None]:
    """switch(name, value) sets (None: unsets) an environment switch and installs it, as an engine start
    would."""
    from meshserve import switches

    def set_switch(name: str, value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        switches.refresh()

    return set_switch
