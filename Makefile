# Two commands do all the set-up: `make demo` and `make test`. Both create .venv with pinned
# versions (torch==2.13.0, the CPU wheel on machines without a GPU) and install eurotrain into it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NPROC ?= 2
PYTEST_ARGS ?=
# Test processes (pytest-xdist): two fill this project's 2-core machines, whose multi-process
# tests wait on each other much of the time; 0 runs the suite in this process, in order.
TEST_WORKERS ?= 2

.PHONY: venv demo test test-quick check lint typecheck format clean

# The pinned set needs CPython >= 3.11 (transformers 5.23 and numpy 2.4.6 publish nothing older).
PYCHECK := import sys; v = sys.version_info[:2]; sys.exit(0 if v >= (3, 11) else \
	"make: $(PY) is Python %d.%d; the pinned versions need 3.11 or newer: run make PY=python3.11 \
	(or python3.12, ...), after loading a newer Python module on a cluster" % v)

$(BIN)/.installed: pyproject.toml requirements-pinned.txt
	$(PY) -c '$(PYCHECK)'
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	# Less what that torch pins itself (a GPU build's own triton): eurotrain/pins.py says which.
	$(BIN)/python eurotrain/pins.py requirements-pinned.txt > $(VENV)/pins.txt
	$(BIN)/pip install -q -r $(VENV)/pins.txt
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q --no-deps -e .
	touch $@

venv: $(BIN)/.installed

# Train the tiny model on the embedded demo corpus with $(NPROC) ranks (CPU here, GPUs if present).
demo: venv
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc-per-node $(NPROC) \
		-m eurotrain.train configs/tiny.yaml --train.steps 100 --logging.log_interval 10

test: venv
	DS_ACCELERATOR=cpu TRITON_INTERPRET=1 $(BIN)/python -m pytest tests -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# A quick local run that skips the slowest multi-process cases (CI runs everything).
test-quick: venv
	DS_ACCELERATOR=cpu TRITON_INTERPRET=1 $(BIN)/python -m pytest tests -q -m "not slow" -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy eurotrain

check: lint typecheck test

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache
