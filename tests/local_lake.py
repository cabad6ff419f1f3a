"""The lake archive and restore tests run against: a local directory.

The tests take a ``lake`` fixture; a fixture parametrized over [local directory, S3 server]
replaces this one by changing the import in those test files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orderbook_store.files.lake_store import Lake
from orderbook_store.ops.archive import directory_lake


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    """An empty lake in a temporary directory."""
    return directory_lake(tmp_path / "lake")


def lake_environment(lake: Lake) -> dict[str, str]:
    """The ``LAKE_*`` variables that configure ``lake`` for the command line."""
    return {"LAKE_URL": lake.url}
