# `make test` and `make lab` both build .venv on first use.
# The pinned CPU torch goes in first: a bare `torch` requirement with no torch
# installed would pull several GB of CUDA wheels.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
# One virtualenv per torch: `make test TORCH=torch==2.11.0` builds .venv-torch-2.11.0 and never
# reuses a .venv made for another torch. The stamp names the torch too, for a VENV given by hand.
TORCH_TAG := $(shell printf '%s' '$(TORCH)' | sed 's/==/-/; s/[^A-Za-z0-9.]/-/g')
ifeq ($(origin TORCH),file)
VENV   ?= .venv
else
VENV   ?= .venv-$(TORCH_TAG)
endif
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(TORCH_TAG)

export OMP_NUM_THREADS ?= 1

.PHONY: test lint format lab install bench e2e notebooks figures clean

$(STAMP): pyproject.toml jupyter-config/fsdp_nb-widget-state.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# An editable install skips the wheel's data files: JupyterLab's default to save widget state with
	# the notebook (so the explorer survives a save and a reopen) is copied where the wheel puts it.
	mkdir -p $(VENV)/share/jupyter/lab/settings/overrides.d
	cp jupyter-config/fsdp_nb-widget-state.json $(VENV)/share/jupyter/lab/settings/overrides.d/
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) lint
	$(PY) -m pytest tests
	# Notebooks run in the deterministic collated output mode, as their saved outputs were made.
	FSDP_NB_COLLATE=1 $(PY) -m pytest --nbval notebooks --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider

# Lint and formatting first: a style slip fails in seconds, not after the suite.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The tutorials in JupyterLab in a real browser (Debian's chromium, Playwright); not part of `make test`.
e2e: $(STAMP)
	@$(PY) -c "import playwright" 2>/dev/null || (echo "make e2e needs Playwright for Python: $(PY) -m pip install playwright (never 'playwright install': it uses /usr/bin/chromium)"; exit 2)
	@test -x /usr/bin/chromium || (echo "make e2e needs Chromium: apt-get install chromium"; exit 2)
	$(PY) e2e/run.py

# The tutorials run again and saved with their new outputs, as nbval compares them (collated, no widget state).
notebooks: $(STAMP)
	$(PY) e2e/refresh_outputs.py

# The README's picture, drawn from the code.
figures: $(STAMP)
	$(PY) docs/make_figures.py

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) benchmarks/session.py

clean:
	rm -rf .venv .venv-torch-* build *.egg-info
