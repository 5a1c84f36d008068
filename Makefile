# One command each, on a fresh clone: `make demo` (set-up + every demo asset) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME := $(CURDIR)/data/dagster_home

.PHONY: install demo dev test lint bench settings-docs

# uv installs the same pins from the same sources as pip (pip's indexes, find-links and
# constraints passed on by tools/uv_pip_args.py) in a fraction of the time: benchmarks/install.py.
# pip is the fallback when uv cannot be installed or fails; `make install INSTALLER=pip` forces it.
INSTALLER ?= uv
UV_VERSION := 0.13.9
UV_FLAGS ?=

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ "$(INSTALLER)" = uv ] && $(PY) -m pip install -q uv==$(UV_VERSION) \
	  && $(VENV)/bin/uv pip install -q $(UV_FLAGS) --python $(PY) $$($(PY) tools/uv_pip_args.py) -e '.[dev]'; \
	then echo "installed with uv $(UV_VERSION)"; \
	else echo "installing with pip"; \
	  $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q -e '.[dev]'; \
	fi
	touch $@

install: $(VENV)/.installed

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m synth_xray_assets.demo

dev: install $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/dagster dev -w workspace.yaml

test: install
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# docs/settings.md from the typed settings (synth_xray_assets/settings.py); a test fails when it is stale.
settings-docs: install
	$(PY) -m synth_xray_assets.settings_reference

bench: install
	for b in standardize dreambooth fid classifier; do $(PY) benchmarks/$$b.py || exit 1; done
