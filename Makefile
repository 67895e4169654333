# The two commands of the README: `make run` and `make test`. Each makes its own
# virtualenv (.venv) on first use, so a fresh clone needs nothing else typed first.
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed

.PHONY: run test bench install uninstall clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	touch $@

run: $(INSTALLED)
	$(VENV)/bin/tsechod --config etc/tsechod.toml

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest

bench: $(INSTALLED)
	$(VENV)/bin/python benchmarks/run.py

install:  # as root: the systemd service under /opt/tsechod (see docs/operations.md)
	./install.sh

uninstall:
	./uninstall.sh

clean:
	rm -rf $(VENV) build src/*.egg-info
