# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REFERENCES := min-dalle==0.4.11 dalle-mini==0.1.5 taming-transformers-rom1504==0.0.6 einops==0.8.2

.PHONY: demo emoji test test-slow test-all bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip setuptools wheel
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# reference implementations for the parity tests, never imported by the project: min-dalle's modules need only
	# torch, and only dalle-mini's pure-Python text.py is used (its package imports JAX), hence --no-deps
	$(BIN)/python -m pip install -q --no-deps $(REFERENCES)
	touch $(STAMP)

install: $(STAMP)

# Two workers: most tests wait on one-thread training subprocesses, so one worker leaves a core idle. --dist
# loadfile keeps a file's tests (and its module fixtures, e.g. the one SLURM cluster) on one worker.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --timeout=600 -n $(TEST_WORKERS) --dist loadfile

# the tests marked slow (pytest exits 5 when there are none to collect)
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --timeout=1800 -n $(TEST_WORKERS) --dist loadfile || [ $$? -eq 5 ]

# every test: make test, then the slow ones
test-all: test test-slow

demo: $(STAMP)
	$(BIN)/python -m demo

# the worked example on real images (docs/emoji.md): needs `apt-get install -y fonts-noto-color-emoji`
emoji: $(STAMP)
	$(BIN)/python -m demo emoji

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf runs .pytest_cache
