# Every target installs what it needs first; `make install` is quick once done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install system-deps test lint demo bench clean

install: $(STAMP) system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# PgBouncer and PostgreSQL's own server binaries (the TLS tests need a server built with SSL,
# which the embedded wheel is not) from Debian's packages, only when missing. Debian's postgresql
# package is kept from creating a cluster on 5432, so the tests' server discovery is unchanged.
system-deps:
	@missing=""; \
	command -v pgbouncer >/dev/null 2>&1 || test -x /usr/sbin/pgbouncer || missing="$$missing pgbouncer"; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "missing:$$missing; run: sudo make system-deps" >&2; exit 1; fi; \
	mkdir -p /etc/postgresql-common; \
	grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf || \
	  echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check orderbook_store tests benchmarks alembic
	$(VENV)/bin/ruff format --check orderbook_store
	$(VENV)/bin/mypy --strict orderbook_store

demo: install
	$(PY) -m orderbook_store.demo

bench: install
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
