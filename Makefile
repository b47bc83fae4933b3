# diffcli developer tasks. `make test` and `make demo` install what they need on first use.
#
# Torch, in one place: `make install` reuses a torch that is already importable (the venv is made
# with --system-site-packages, so a system-wide torch counts). Otherwise, on a machine with no
# NVIDIA GPU it installs $(TORCH_CPU) (on this project's machines torch==2.13.0 is a CPU wheel on
# local disk; elsewhere pass TORCH_INDEX=https://download.pytorch.org/whl/cpu to get a CPU build),
# and with an NVIDIA GPU it lets pip pick the default (CUDA) build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.diffcli-installed

.PHONY: install test lint demo bench weights clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch: reusing $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "torch: NVIDIA GPU found, installing the default (CUDA) build"; \
		$(PY) -m pip install -q torch; \
	else \
		echo "torch: no NVIDIA GPU, installing $(TORCH_CPU) (CPU)"; \
		$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check diffcli tests benchmarks

demo: install
	$(VENV)/bin/diffcli inspect-schedule --steps 50

clean:
	rm -rf $(VENV) .pytest_cache
