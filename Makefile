# The two commands of the README: `make test` and `make demo`. Both install what they need first
# (scripts/install.sh is idempotent: a second run only checks).
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test demo lint format bench clean deploy-tools compose-smoke

install:
	VENV=$(VENV) scripts/install.sh all

test: install deploy-tools
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

# docker-compose (Debian's 1.29) for the compose files' validation in `make test` (root: installed
# if missing; otherwise those tests skip). See docs/deploy.md.
deploy-tools:
	scripts/docker_engine.sh tools

# Both images built and the CPU compose stack run for real (minutes; root): starts dockerd if none
# runs (and stops it after), result and timings in out/compose-smoke.json. See docs/deploy.md.
compose-smoke: install
	scripts/docker_engine.sh start
	LATENTPI_COMPOSE_SMOKE=1 $(PY) -m pytest -m compose tests/test_compose_smoke.py -s; \
	  rc=$$?; scripts/docker_engine.sh stop; exit $$rc
