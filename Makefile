# `make demo` and `make test` set up everything from the repo's own files on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-unit test-integration bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rayscreen demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

test-integration: $(STAMP)
	$(PY) -m pytest tests/integration -q

bench: $(STAMP)
	$(PY) benchmarks/ingest.py --preset small

clean:
	rm -rf $(VENV) demo_out bench_out
