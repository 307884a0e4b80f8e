# Two entry points work on a fresh clone: `make demo` and `make test`. Both create (or
# reuse) the project's virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.spatialcore-installed

.PHONY: venv demo test bench cuda lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# torch/torchvision pinned to the pair the machines keep on local disk (see pyproject).
	@$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	@$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spatialcore demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider profiling/benchmarks --benchmark-only --benchmark-columns=median,iqr,rounds

cuda: $(STAMP)
	$(VENV)/bin/cmake -S . -B build -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja -DPython3_EXECUTABLE=$(abspath $(PY)) && $(VENV)/bin/cmake --build build

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build runs .pytest_cache
