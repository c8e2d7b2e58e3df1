# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick test test-slow test-all setup clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,demo]"
	@touch $(STAMP)

setup: $(STAMP)

# The study on the shipped demo family: sweep (resumable; rerun to continue), fits, plots and report.
DEMO_OUT ?= runs/demo
DEMO_WORKERS ?= 2
demo: $(STAMP)
	$(VENV)/bin/bitlaws sweep --config configs/sweeps/demo.py --out $(DEMO_OUT) --workers $(DEMO_WORKERS)
	$(VENV)/bin/bitlaws report --results $(DEMO_OUT)
	@echo "demo: results, plots and report are in $(DEMO_OUT)/ (open $(DEMO_OUT)/report.md)"

demo-quick: $(STAMP)
	$(VENV)/bin/bitlaws sweep --config configs/sweeps/demo.py:quick --out runs/demo-quick --workers $(DEMO_WORKERS)
	$(VENV)/bin/bitlaws report --results runs/demo-quick

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
