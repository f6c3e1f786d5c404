# fediim: two entry points from a fresh clone (Python 3.11 + pip is all you need).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
SIM    := $(VENV)/.installed-sim

.PHONY: test-slow test demo lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The tests also run the Simulation Engine (Ray): its extra is installed for them only.
$(SIM): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,sim]"
	touch $(SIM)

# pytest's own exit code: "no tests collected" (5) is a failure, like any other. Two
# workers, one test file each at a time (module fixtures such as the real deployment stay
# in one worker): the deployment tests mostly wait, so the other core keeps working.
test: $(SIM)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

# The slow tests (a real TLS deployment with secure aggregation and a killed SuperNode,
# ~3 min): CI runs them after `make test`.
test-slow: $(SIM)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) -m fediim.cli.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) benchmarks/paper_protocol.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
