# kubetune — `make demo` and `make test` do all set-up themselves on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .tools
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0
export PATH := $(CURDIR)/$(TOOLS)/bin:$(PATH)

.PHONY: setup tools test test-fast lint format demo bench soak clean

setup: $(STAMP) tools

# torch/torchvision resolve to the newest release the machine allows (a local copy where one exists).
# kubetune itself, with the trainer and the test tools, and devtools/ (kubetune-dev: the dev cluster and
# `kubetune demo`), each editable; kubetune-dev's own requirement on kubetune is met by this checkout.
$(STAMP): pyproject.toml devtools/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[trainer,dev]' -e ./devtools
	@touch $@

# Real servers and CLIs the tests drive, unpacked from Debian packages into .tools (no system service).
tools: $(TOOLS)/bin/promtool $(TOOLS)/bin/kubectl $(TOOLS)/bin/chromium
$(TOOLS)/bin/promtool:
	@mkdir -p $(TOOLS)/deb $(TOOLS)/bin
	@command -v apt-get >/dev/null || { echo "apt-get is needed to fetch Debian's prometheus package"; exit 1; }
	cd $(TOOLS)/deb && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; }
	for f in $(TOOLS)/deb/*.deb; do dpkg-deb -x $$f $(TOOLS)/root; done
	ln -sf $(CURDIR)/$(TOOLS)/root/usr/bin/prometheus $(TOOLS)/bin/prometheus
	ln -sf $(CURDIR)/$(TOOLS)/root/usr/bin/promtool $(TOOLS)/bin/promtool

# A real kubectl (Debian's kubernetes-client) to drive the demo's embedded API and its e2e tests.
$(TOOLS)/bin/kubectl:
	@mkdir -p $(TOOLS)/deb $(TOOLS)/bin
	cd $(TOOLS)/deb && { ls kubernetes-client_*.deb >/dev/null 2>&1 || apt-get download kubernetes-client 2>/dev/null || { apt-get update -qq && apt-get download kubernetes-client; }; }
	dpkg-deb -x $$(ls $(TOOLS)/deb/kubernetes-client_*.deb | head -1) $(TOOLS)/root
	ln -sf $(CURDIR)/$(TOOLS)/root/usr/bin/kubectl $(TOOLS)/bin/kubectl

# A real headless browser for the tests of report.html: Debian's chromium. Unlike the two above it needs
# its shared libraries too, so apt-get installs it (as root, no service) unless the machine already has it.
$(TOOLS)/bin/chromium:
	@mkdir -p $(TOOLS)/bin
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null || { echo "apt-get is needed to install Debian's chromium"; exit 1; }; \
	  apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }; }
	ln -sf "$$(command -v chromium)" $(TOOLS)/bin/chromium

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check operator trainer devtools tests bench
	$(VENV)/bin/ruff format --check operator trainer devtools tests bench
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format operator trainer devtools tests bench
	$(VENV)/bin/ruff check --fix operator trainer devtools tests bench

demo: setup
	$(VENV)/bin/kubetune demo

bench: setup
	$(PY) -m bench

# The chaos soak (not part of `make test`): a stream of small jobs on the dev cluster for MINUTES while a
# schedule drawn from SEED injects faults; writes soak/results.md, fails when an invariant does.
MINUTES ?= 20
JOBS ?= 8
SEED ?= 23
soak: setup
	$(PY) -m kubetune_dev.soak --minutes $(MINUTES) --jobs $(JOBS) --seed $(SEED)

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
