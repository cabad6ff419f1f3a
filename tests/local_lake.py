"""The lake the archive and restore tests run against here: a local directory.

It offers what the shared lake fixtures (``[local, s3]``) offer, under the same names:
``lake_config`` (the settings naming the lake, and the same as ``LAKE_*`` variables for a
process) and ``lake`` (the ``Lake`` they open). A test module takes them by naming them
(``lake = local_lake.lake``); dropping those lines hands it the shared, parametrized ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orderbook_store.files.lake_store import Lake, open_lake
from orderbook_store.settings import Settings


@dataclass(frozen=True)
class LocalLakeConfig:
    """A lake in a directory: ``values`` are its settings, ``env`` the same as variables."""

    values: dict[str, str]
    kind: str = "local"

    @property
    def url(self) -> str:
        return self.values["lake_url"]

    @property
    def env(self) -> dict[str, str]:
        return {"LAKE_URL": self.url}

    def settings(self, **more: Any) -> Settings:
        return Settings(**self.values, **more)

    def open(self) -> Lake:
        opened = open_lake(self.settings())
        assert opened is not None
        return opened


@pytest.fixture
def lake_config(tmp_path: Path) -> LocalLakeConfig:
    """A fresh lake directory."""
    return LocalLakeConfig({"lake_url": str(tmp_path / "lake")})


@pytest.fixture
def lake(lake_config: LocalLakeConfig) -> Lake:
    """The ``Lake`` of ``lake_config``, empty."""
    return lake_config.open()
