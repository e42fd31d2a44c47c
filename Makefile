# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip setuptools wheel
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --timeout=600

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=1800

demo: $(STAMP)
	$(BIN)/python -m launch.demo

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf runs .pytest_cache
