# The two commands of the README: `make test` and `make demo`. Both install what they need first
# (scripts/install.sh is idempotent: a second run only checks).
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test demo lint format bench clean

install:
	VENV=$(VENV) scripts/install.sh all

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/latentpi demo

lint: install
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Every benchmark in turn (each prints its own table; see docs/benchmarks.md).
bench: install
	@for script in bench/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
