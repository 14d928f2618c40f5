# make demo  - set up and run the demo (two namespaces, a ruleset, traffic, counters)
# make test  - set up, lint, and run the whole test suite against the running kernel
# make bench - set up and run the benchmark (prints ratio tables; not a test)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m bpfilter.demo

lint: setup
	$(VENV)/bin/ruff check bpfilter tests $(wildcard bench)

test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	@$(PY) -c "import matplotlib" 2>/dev/null || \
		$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
