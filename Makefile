# Two commands do everything on a fresh machine: `make sweep` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SPACE ?= search_spaces/default.yaml
# each `make sweep` is a new sweep (a name is used once per storage); `make report` takes the latest
NAME ?= $(basename $(notdir $(SPACE)))_$(shell date +%Y%m%d_%H%M%S)
export PYTHONUNBUFFERED := 1

.PHONY: install test sweep report ui tracking-server bench lint clean

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

# MLflow server on a local PostgreSQL (scripts/pg-local) in ./.tracking, until Ctrl-C
TRACKING_HOST ?= 127.0.0.1
TRACKING_PORT ?= 5000
tracking-server: install
	$(VENV)/bin/study server --host $(TRACKING_HOST) --port $(TRACKING_PORT)

bench: install
	$(PY) -m benchmarks.run

# the default store (mlflow.db), its artifacts (mlartifacts/; mlruns/ before they moved there)
# and the sweeps' Ray state; the tracking server's .tracking/ (a database) is kept
clean:
	rm -rf $(VENV) reports mlflow.db mlartifacts mlruns ray_results .pytest_cache
