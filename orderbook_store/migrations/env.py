"""Alembic's ``env.py`` for the package's own script directory (an installed package, the CLI
and ``orderbook_store.ops.migrations``): the environment lives in ``environment.run``."""

from orderbook_store.migrations.environment import run

run()
