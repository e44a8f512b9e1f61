# Two commands do everything on a fresh machine: `make sweep` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SPACE ?= search_spaces/default.yaml
# each `make sweep` is a new sweep (a name is used once per storage); `make report` takes the latest
NAME ?= $(basename $(notdir $(SPACE)))_$(shell date +%Y%m%d_%H%M%S)
export PYTHONUNBUFFERED := 1

.PHONY: install test sweep report ui bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU-only machine: take the CPU build of torch first (a bare range would pull CUDA wheels)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: install lint
	$(PY) -m pytest -q

sweep: install
	$(VENV)/bin/study sweep $(SPACE) --name $(NAME)

report: install
	$(VENV)/bin/study report

ui: install
	$(VENV)/bin/study ui

bench: install
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) reports mlflow.db ray_results .pytest_cache
