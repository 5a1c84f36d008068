# One command each, on a fresh clone: `make demo` (set-up + every demo asset) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME := $(CURDIR)/data/dagster_home

.PHONY: install demo dev test lint bench settings-docs image lock lock-check

# The project's version, set once in pyproject.toml: the image's tag (deploy/values.yaml names it).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_REPOSITORY ?= registry.example.org/synth-xray

# One locked environment: requirements.lock pins every package (the dev extra: what make install,
# CI and the tests use); deploy/requirements.lock, what the image installs, takes the gpu extra
# under the same pins. Both are `uv pip compile --universal` output (without the "via" notes, which
# name machine-specific constraint files), which pip reads as well.
# `make lock` refreshes them after a change to pyproject.toml (keeping every pin that still fits);
# `make lock-check` (CI) fails when they no longer match it.
# uv installs the same pins from the same sources as pip (pip's indexes, find-links and
# constraints passed on by tools/uv_pip_args.py) in a fraction of the time: benchmarks/install.py.
# pip is the fallback when uv cannot be installed or fails; `make install INSTALLER=pip` forces it.
INSTALLER ?= uv
UV_VERSION := 0.13.9
UV_FLAGS ?=
UV ?= $(VENV)/bin/uv
LOCK := requirements.lock
IMAGE_LOCK := deploy/requirements.lock
COMPILE = $(UV) pip compile -q pyproject.toml --universal --python-version 3.11 \
  --no-annotate --custom-compile-command "make lock" $$($(PY) tools/uv_pip_args.py)

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ "$(INSTALLER)" = uv ] && $(PY) -m pip install -q uv==$(UV_VERSION) \
	  && $(VENV)/bin/uv pip install -q $(UV_FLAGS) --python $(PY) $$($(PY) tools/uv_pip_args.py) \
	       --no-deps -r $(LOCK) -e .; \
	then echo "installed $(LOCK) with uv $(UV_VERSION)"; \
	else echo "installing $(LOCK) with pip"; \
	  $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q --no-deps -r $(LOCK) -e .; \
	fi
	touch $@

lock:
	test -x $(UV) || $(PY) -m pip install -q uv==$(UV_VERSION)
	$(COMPILE) --extra dev -o $(LOCK)
	$(COMPILE) --extra gpu -c $(LOCK) -o $(IMAGE_LOCK)

lock-check:
	tmp=$$(mktemp -d) && cp $(LOCK) $$tmp/dev && cp $(IMAGE_LOCK) $$tmp/image \
	  && $(COMPILE) --extra dev -o $$tmp/dev && $(COMPILE) --extra gpu -c $(LOCK) -o $$tmp/image \
	  && diff -u $(LOCK) $$tmp/dev && diff -u $(IMAGE_LOCK) $$tmp/image; \
	status=$$?; rm -rf $$tmp; \
	if [ $$status -ne 0 ]; then echo "$(LOCK) or $(IMAGE_LOCK) does not match pyproject.toml: run make lock"; fi; \
	exit $$status

install: $(VENV)/.installed

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m synth_xray_assets.demo

# The gpu pool's limit and the runs at once follow the cards (operations/pools.py; a pool limit set
# by hand is kept, the run limit only rises).
dev: install $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m synth_xray_assets.operations.pools --runs
	$(VENV)/bin/dagster dev -w workspace.yaml

test: install
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint deploy/Dockerfile

image:
	docker build -f deploy/Dockerfile --build-arg VERSION=$(VERSION) -t $(IMAGE_REPOSITORY):$(VERSION) .

# docs/settings.md from the typed settings (synth_xray_assets/settings.py); a test fails when it is stale.
settings-docs: install
	$(PY) -m synth_xray_assets.settings_reference

bench: install
	for b in standardize dreambooth fid classifier; do $(PY) benchmarks/$$b.py || exit 1; done
