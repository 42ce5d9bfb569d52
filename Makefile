# Set-up is automatic: `make run` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RUNS ?= runs

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The stage pipeline on the embedded data (pretrain for now); re-running resumes.
run: $(STAMP)
	$(PY) -m experiments.pipeline --runs=$(RUNS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=10 tests

clean:
	rm -rf $(RUNS)

# Train-step benchmark against PyTorch (eager and compiled), input pipeline and loop overhead.
bench: $(STAMP)
	$(PY) -m experiments.benchmarks.train_step
