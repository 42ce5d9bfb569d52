# Set-up is automatic: `make run`, `make test` and `make bench` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.core-stamp
TEST := $(VENV)/.test-stamp
RUNS ?= runs

.PHONY: install run test bench clean

$(CORE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(CORE)

# Test and benchmark oracles (torch CPU, transformers) on top of the core install.
$(TEST): $(CORE)
	$(PY) -m pip install -q -e '.[test]'
	touch $(TEST)

install: $(TEST)

# The stage pipeline on the embedded data: pretrain -> SFT -> DPO, reward model -> GRPO, PPO; re-running resumes.
run: $(CORE)
	$(PY) -m experiments.pipeline --runs=$(RUNS)

test: $(TEST)
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=10 tests

# Train-step benchmark against PyTorch (eager and compiled), input pipeline and loop overhead.
# `make bench ISA=avx2` restricts both sides to AVX2 (an AVX-512 machine measuring the other kind).
bench: $(TEST)
	$(PY) -m experiments.benchmarks.train_step $(if $(ISA),--isa=$(ISA))

clean:
	rm -rf $(RUNS)
