"""The schema's Alembic scripts, shipped inside the package so an installed copy can migrate.

``versions/`` holds one revision per schema change; ``env.py`` runs ``environment.run`` (async,
the URL from ``Settings``). ``orderbook_store.ops.migrations`` points Alembic here without
any alembic.ini; a checkout's ``alembic.ini`` and ``alembic/env.py`` use the same revisions, so
``alembic upgrade head`` and ``orderbook-store upgrade`` run the very same scripts.
"""

from __future__ import annotations

from pathlib import Path

#: This directory: Alembic's ``script_location`` for the package's own configuration.
SCRIPT_DIRECTORY = Path(__file__).resolve().parent
#: Where the revisions live (``version_locations`` in the checkout's alembic.ini).
VERSIONS_DIRECTORY = SCRIPT_DIRECTORY / "versions"
