"""The old collector's import path: ``from orderbook_store.compat import DataManager``.

Its names live in :mod:`orderbook_store.legacy_collector`; this module keeps the path the old
collector was written against.
"""

from __future__ import annotations

from orderbook_store.legacy_collector import (
    DataManager,
    FileStorage,
    PostgreSQLManager,
    StorageBackend,
)

__all__ = ["DataManager", "FileStorage", "PostgreSQLManager", "StorageBackend"]
