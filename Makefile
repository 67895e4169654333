# The two commands of the README: `make run` and `make test`. Each makes its own
# virtualenv (.venv) on first use, so a fresh clone needs nothing else typed first.
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed

.PHONY: run test check bench install uninstall clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	touch $@

run: $(INSTALLED)
	$(VENV)/bin/tsechod --config etc/tsechod.toml

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest

# The edit-test loop: the type check, then everything but the soak, the systemd lab and the
# benchmark smoke. `make test` (what CI runs) is the whole suite.
check: $(INSTALLED)
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -m "not slow and not systemd"

bench: $(INSTALLED)
	$(VENV)/bin/python benchmarks/run.py

install:  # as root: the systemd service under /opt/tsechod (see docs/operations.md)
	./install.sh

uninstall:
	./uninstall.sh

clean:
	rm -rf $(VENV) build src/*.egg-info
