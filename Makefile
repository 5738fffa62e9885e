# Two commands on a fresh machine: `make run` and `make test`.
# Both create .venv when missing and install the project into it (idempotent: a stamp file
# skips the install until pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first and exactly: pip takes 2.13.0 from a local CPU wheel; a looser request pulls a CUDA build.
TORCH := torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: run test test-triton lint clean native

# Native kernels (kernels/csrc) compiled for this machine and torch; a no-op when that build exists.
native: $(STAMP)
	$(BIN)/python -m meshserve.kernels.native

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: native
	$(BIN)/meshserve demo

test: native lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -m "not slow"

# The Triton attention kernel's tests with the gpu extra (triton) installed: natively on a CUDA machine,
# under Triton's interpreter on CPU (the plain `make test` skips them where triton is missing).
test-triton: native
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,gpu]'
	$(BIN)/python -m pytest -q tests/kernels/test_triton_attention.py tests/kernels/test_attention_backend.py

lint: $(STAMP)
	$(BIN)/ruff check meshserve tests benchmarks
	$(BIN)/ruff format --check meshserve tests benchmarks

clean:
	rm -rf $(VENV) out build .pytest_cache .ruff_cache
