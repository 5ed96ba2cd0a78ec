# Two commands do all set-up on a fresh machine:
#   make repro   - create .venv if missing, install resnorm + pinned deps, run `dvc repro`
#   make test    - same bootstrap, then the test suite
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: repro test venv bench clean-venv plots-template

venv: $(STAMP)

# Re-install only when pyproject.toml changes: running `make` twice installs nothing twice.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e .
	touch $(STAMP)

repro: $(STAMP)
	@start=$$(date +%s); . $(VENV)/bin/activate && dvc repro && echo "stage wall times:" && python -m resnorm.times $$start

# One worker per core (pytest-xdist); --dist loadfile keeps each file's tests, and the module
# fixtures they share (the pipeline's repository), in one worker, in file order.
test: $(STAMP)
	. $(VENV)/bin/activate && python -m pytest -n auto --dist loadfile

bench: $(STAMP)
	. $(VENV)/bin/activate && python bench/bench_norms.py

clean-venv:
	rm -rf $(VENV)

plots-template:            # .dvc/plots/offline.html: `dvc plots show` offline (vega, vega-lite, vega-embed inlined)
	tmp=$$(mktemp -d) && cd $$tmp && npm pack --silent vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2 >/dev/null && \
	cd $(CURDIR) && python3 scripts/offline_plots_template.py $$tmp && rm -rf $$tmp
