"""Shared fixtures of the kernel tests."""

from __future__ import annotations

import pytest

from meshserve.kernels import native


@pytest.fixture(scope="module")
def native_op() -> None:
    """A module of native-op tests fails here, saying how to build the ops, when they are not built."""
    if not native.load():
        pytest.fail(f"native kernels missing: run `{native.BUILD_COMMAND}` (make test does)")
