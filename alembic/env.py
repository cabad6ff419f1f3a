"""Alembic's ``env.py`` for ``alembic`` run in a checkout: the same environment as the installed
package (``orderbook_store/migrations/environment.py``), and the same revisions
(``orderbook_store/migrations/versions``, named by ``version_locations`` in alembic.ini)."""

from orderbook_store.migrations.environment import run

run()
