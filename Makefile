# Two commands set everything up: `make run` and `make test`.
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PREFIX  ?= /usr/local
DESTDIR ?=

.PHONY: run test lint bench clean install uninstall

# The stamp files re-install only when pyproject.toml changes.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# The test extras only: the tests install their plugins (tests/plugin_pkg) where
# only their own servers look, so `chatctl plugins` after `make run` never lists them.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

# A $(VENV) made by an older `make test` has the test plugins installed: take them out.
STALE_TEST_PLUGINS = $(wildcard $(VENV)/lib/python*/site-packages/chatd_test_plugins-*.dist-info)
DROP_STALE_TEST_PLUGINS = $(if $(STALE_TEST_PLUGINS),$(BIN)/pip uninstall -q -y chatd-test-plugins)

run: $(VENV)/.installed
	$(DROP_STALE_TEST_PLUGINS)
	$(BIN)/chatd run

test: $(VENV)/.installed-test
	$(DROP_STALE_TEST_PLUGINS)
	scripts/test-deps.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Fan-out throughput and latency against a bare-loop baseline, 10,000 sessions, then the
# cost of a login from 1,000 and from 100,000 distinct sources, then the pause of a
# handover restart.
bench: $(VENV)/.installed
	$(BIN)/python benchmarks/fanout.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/logins.py
	$(BIN)/python benchmarks/handover.py
	@if command -v redis-server >/dev/null; then $(BIN)/python benchmarks/cluster.py; \
	else echo "benchmarks/cluster.py skipped: redis-server is not installed"; fi

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

# System-wide: a virtual environment in $(PREFIX)/lib/chatd, links in $(PREFIX)/bin,
# man pages, systemd units, and /etc/chatd/chatd.yaml unless one exists.
install:
	PREFIX='$(PREFIX)' DESTDIR='$(DESTDIR)' PYTHON='$(PYTHON)' bash scripts/install.sh install

uninstall:
	PREFIX='$(PREFIX)' DESTDIR='$(DESTDIR)' bash scripts/install.sh uninstall

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
