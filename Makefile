# Every target installs what it needs first; a second run is quick. `make demo` needs only
# Python 3.10+ (no root, no system packages); `make test` also needs PgBouncer and PostgreSQL's
# server from the system's packages (see system-deps).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.installed-stamp
DEMO_STAMP := $(VENV)/.demo-stamp

.PHONY: install install-demo system-deps test lint demo bench bench-scale clean

# The development set (tests, lint, benchmarks, every dataframe library): about 1 GB.
install: $(STAMP)

# Only what the demo needs: the package, pandas and the embedded PostgreSQL server.
install-demo: $(DEMO_STAMP)

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	  echo "orderbook_store needs Python 3.10 or newer; '$(PYTHON)' is not: run make with PYTHON=python3.12 (or another 3.10+)" >&2; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PIP) -e '.[dev]'
	touch $(STAMP)

$(DEMO_STAMP): pyproject.toml | $(PY)
	$(PIP) -e '.[demo]'
	touch $(DEMO_STAMP)

# PgBouncer and PostgreSQL's own server binaries, which the PgBouncer and TLS tests start (the
# embedded wheel's server is built without SSL), from Debian's packages when missing. Debian's
# postgresql package is kept from creating a cluster on 5432, so the tests' server discovery is
# unchanged. Installing needs root; without it this says what to run and stops.
PGBOUNCER_BINS ?= /usr/sbin/pgbouncer
POSTGRES_BINS ?= /usr/lib/postgresql/*/bin/postgres
system-deps:
	@missing=""; \
	{ command -v pgbouncer || ls $(PGBOUNCER_BINS); } >/dev/null 2>&1 || missing="$$missing pgbouncer"; \
	ls $(POSTGRES_BINS) >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "make test: the PgBouncer and TLS tests need these system packages:$$missing" >&2; \
	  echo "installing them needs root; run this, then make test again:" >&2; \
	  echo "    sudo make system-deps" >&2; \
	  echo "(it runs apt-get install$$missing; without apt-get, install PgBouncer and a PostgreSQL server built with SSL yourself)" >&2; \
	  exit 1; \
	fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make test: the PgBouncer and TLS tests need:$$missing; there is no apt-get here: install PgBouncer and a PostgreSQL server built with SSL with this system's package manager, then make test again" >&2; \
	  exit 1; \
	fi; \
	mkdir -p /etc/postgresql-common; \
	grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf || \
	  echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing

test: install system-deps
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check orderbook_store tests benchmarks alembic
	$(VENV)/bin/ruff format --check orderbook_store
	$(VENV)/bin/mypy --strict orderbook_store

demo: $(DEMO_STAMP)
	$(PY) -m orderbook_store.demo

bench: install
	$(PY) -m benchmarks

# 30 million quotes through upgrade and compaction (ROWS=... for fewer): minutes, ~12 GB of disk.
ROWS ?= 30000000
bench-scale: install
	$(PY) -m benchmarks.scale --rows $(ROWS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
