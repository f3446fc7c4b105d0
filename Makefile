# `make demo` and `make test` set up .venv on first use (scripts/setup.sh), then run.
PY := .venv/bin/python

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

.PHONY: setup demo test bench
setup: .venv/.installed

demo: .venv/.installed
	$(PY) examples/demo.py

test: .venv/.installed
	$(PY) -m pytest

bench: .venv/.installed
	$(PY) benchmarks/run_all.py
