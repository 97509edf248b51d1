# Mailroom: run `make` for the list of targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
APP := services/mailroom
VENV := $(CURDIR)/.venv
UV_VERSION := 0.13.8
UV := $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)
export UV_PROJECT_ENVIRONMENT := $(VENV)
BIN := $(VENV)/bin

.PHONY: help setup test test-fast lint fmt typecheck dev demo bench chaos clean

help: ## Show this help
	@echo "Mailroom - asynchronous email delivery for Django teams"
	@echo
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(CURDIR)/.tools/bin/uv:
	$(PYTHON) -m venv $(CURDIR)/.tools
	$(CURDIR)/.tools/bin/pip install --quiet uv==$(UV_VERSION)

# The checkout's root and the app's directory go on the virtualenv's path (a .pth file, as
# an editable install would add), so bench/*.py, chaos/ and dev/ import mailroom_testkit
# and the app without editing sys.path.
$(VENV)/.synced: $(APP)/pyproject.toml $(APP)/uv.lock | $(UV)
	$(UV) sync --frozen --project $(APP) --python $(PYTHON)
	printf '%s\n' "$(CURDIR)" "$(CURDIR)/$(APP)" >"$$($(BIN)/python -c \
		'import sysconfig; print(sysconfig.get_paths()["purelib"])')/mailroom-checkout.pth"
	@touch $@

setup: $(VENV)/.synced ## Create .venv and install the locked dependencies

lint: setup ## ruff check, ruff format --check, mypy and the import layers (.importlinter)
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --check --no-cache .
	SECRET_KEY=mypy $(BIN)/mypy
	cd $(APP) && $(BIN)/lint-imports --no-cache $(CURDIR)/.importlinter

typecheck: setup ## mypy only
	SECRET_KEY=mypy $(BIN)/mypy

fmt: setup ## Format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Two pytest-xdist workers: most of the suite waits on processes (a worker, an SMTP reply,
# a sweep), so two interleave well even on two cores. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: setup ## Lint, then every test (needs Redis and PostgreSQL on localhost)
	$(MAKE) --no-print-directory lint
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-fast: setup ## The in-process layer only (no worker, gunicorn, browser): stop at the first failure
	$(BIN)/pytest -x -m "not integration" $(PYTEST_ARGS)

dev: setup ## Run web, both worker pools, beat, Flower, an SMTP sink and celery-exporter locally
	$(BIN)/python dev/run.py

# With Docker: the compose stack (started if needed) gets the demo. Without: the make dev stack
# (start it first), reached with make dev's own environment.
demo: ## Send a sample campaign and a few transactional emails (docker compose, else make dev)
	@if docker compose version >/dev/null 2>&1; then \
		docker compose up --detach && docker compose --profile demo run --rm demo; \
		echo "Mailpit: http://localhost:8025  Grafana: http://localhost:3000  API key: docker compose logs migrate"; \
	else \
		echo "docker compose not found: sending to the make dev stack"; \
		test -x $(BIN)/python || { echo "run make setup (and make dev) first"; exit 2; }; \
		$(BIN)/python -c \
			'import os, sys; from dev.run import environment; \
			os.execve(sys.executable, [sys.executable, "$(APP)/manage.py", "demo", "--wait", "60"], \
			environment(os.environ, 1025))'; \
	fi

bench: setup ## Benchmarks, each against a baseline from the same run; then bench/REPORT.md
	@mkdir -p bench/output
	$(BIN)/python bench/delivery.py --repeat 3 --json bench/output/delivery.json
	$(BIN)/python bench/ingest.py --repeat 3 --json bench/output/ingest.json
	$(BIN)/python bench/api.py --repeat 3 --json bench/output/api.json
	$(BIN)/python bench/bypasses.py --json bench/output/bypasses.json
	$(BIN)/python bench/relay.py --json bench/output/relay.json
	$(BIN)/python bench/latency.py --json bench/output/latency.json
	$(BIN)/python bench/scaling.py --json bench/output/scaling.json
	$(BIN)/python bench/dashboard.py --json bench/output/dashboard.json
	$(BIN)/python bench/report.py

chaos: setup ## Faults injected into the whole system while it sends 20,000 emails; a table
	$(BIN)/python -m chaos.run $(CHAOS_ARGS)

clean: ## Remove the virtualenv, caches and test output
	rm -rf $(VENV) .tools test-output .mypy_cache .ruff_cache
