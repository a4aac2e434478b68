# Two entry points: `make repro` (set up, then run the default pipeline) and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup repro test lint lock mlflow-ui clean browser wheels

setup: $(STAMP)

# Everything comes from requirements.lock (exact versions); pyproject.toml holds the ranges it was solved from.
# Bytecode compiled at install: where PYTHONDONTWRITEBYTECODE is set (CI images, this project's sandboxes) every
# stage, dvc and test process would otherwise compile torch, mlflow and dvc from source (2-3 s CPU each).
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==0.13.8
	$(UV) pip install --python $(PY) -q --compile-bytecode -r requirements.lock
	$(UV) pip install --python $(PY) -q --no-deps -e .
	touch $@

repro: setup
	dvc repro

# One pytest-xdist worker per core.
test: setup
	ruff check .
	pytest -n auto

lint: setup
	ruff check .

lock: setup
	$(UV) pip compile pyproject.toml --extra dev --extra dask --python-version 3.11 -o requirements.lock

mlflow-ui: setup
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# The packages bench/device.sh needs on the GPU machine (no network there), listed in bench/device-wheels.txt.
wheels:
	bash bench/fetch-wheels.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Headless Chromium for tests/test_ui.py (MLflow UI and `dvc plots show` pages); skipped when absent, except
# in CI (CI=true), where its absence fails the tests.
browser:
	@if [ -x /usr/bin/chromium ]; then echo "chromium: $$(/usr/bin/chromium --version)"; else \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi
