# Every target creates .venv on first use, so a fresh clone needs nothing else.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ROOT   ?= ./t2v-data

export RAY_AUTH_MODE ?= disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv demo demo-small test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,notebooks]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo --root $(ROOT)

demo-small: $(STAMP)
	$(PY) -m jobs.demo --root $(ROOT) --small

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) -m benchmarks.fisher
	$(PY) -m benchmarks.distances
	$(PY) -m benchmarks.embed_scaling
	$(PY) -m benchmarks.matrix_cost
	$(PY) -m benchmarks.embed_load

lint: $(STAMP)
	$(PY) -m ruff check t2v_core jobs tests benchmarks scripts

clean:
	rm -rf $(ROOT) .pytest_cache
