# loop-ray: `make run` and `make test` set everything up themselves.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1

.PHONY: install run test test-fast bench study lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m loop_ray.cli train --config configs/toy.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m loop_ray.cli bench

study: $(STAMP)
	$(PY) -m loop_ray.cli study

lint: $(STAMP)
	$(PY) -m ruff check loop_ray tests scripts examples

clean:
	rm -rf .venv runs .pytest_cache
