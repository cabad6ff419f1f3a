"""Lake fixtures: every lake test runs on a local directory and on S3 (moto on loopback).

``lake_config`` is parametrized ``["local", "s3"]``: a fresh directory, or a fresh bucket on
the session's S3 server (started the first time an S3 case asks for it, stopped at the end of
the run). It carries the ``Settings`` values that name the lake (``values``) and the same as
``LAKE_*`` environment variables (``env``) for tests that run the command line. ``lake`` is the
``Lake`` those settings open. A bucket is emptied and removed after its test.

Imported into ``conftest.py``, so any test file can take ``lake`` or ``lake_config``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orderbook_store.files.lake_store import Lake, open_lake
from orderbook_store.settings import Settings

from s3server import S3Server, s3_server

__all__ = ["LakeConfig", "lake", "lake_config", "s3"]

_ENV = {
    "lake_url": "LAKE_URL",
    "lake_endpoint_url": "LAKE_ENDPOINT_URL",
    "lake_region": "LAKE_REGION",
    "lake_access_key_id": "LAKE_ACCESS_KEY_ID",
    "lake_secret_access_key": "LAKE_SECRET_ACCESS_KEY",
}
_buckets = itertools.count()


@dataclass(frozen=True)
class LakeConfig:
    """One lake under test: ``kind`` ("local" or "s3") and the settings that name it."""

    kind: str
    values: dict[str, str]
    server: S3Server | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.values["lake_url"]

    @property
    def env(self) -> dict[str, str]:
        """The ``LAKE_*`` environment variables naming this lake, for the console script."""
        return {_ENV[key]: value for key, value in self.values.items()}

    def settings(self, **more: Any) -> Settings:
        """``Settings`` with this lake (and ``more``, e.g. ``database_url``)."""
        return Settings(**self.values, **more)

    def open(self) -> Lake:
        opened = open_lake(self.settings())
        assert opened is not None
        return opened


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """The run's S3 server (moto on a free loopback port), stopped when the run ends."""
    with s3_server() as server:
        yield server


def _s3_values(server: S3Server, bucket: str, prefix: str) -> dict[str, str]:
    return {
        "lake_url": f"s3://{bucket}/{prefix}",
        "lake_endpoint_url": server.endpoint_url,
        "lake_region": server.region,
        "lake_access_key_id": server.access_key_id,
        "lake_secret_access_key": server.secret_access_key,
    }


def _s3_filesystem(server: S3Server) -> Any:
    from pyarrow import fs

    scheme, _, address = server.endpoint_url.partition("://")
    return fs.S3FileSystem(
        access_key=server.access_key_id,
        secret_key=server.secret_access_key,
        region=server.region,
        endpoint_override=address,
        scheme=scheme,
        allow_bucket_creation=True,
        allow_bucket_deletion=True,
    )


@pytest.fixture(params=["local", "s3"])
def lake_config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LakeConfig]:
    """A fresh lake: a new directory, or a new bucket (with a prefix) on the S3 server."""
    if request.param == "local":
        yield LakeConfig("local", {"lake_url": str(tmp_path / "lake")})
        return
    server: S3Server = request.getfixturevalue("s3")
    bucket = f"lake-{os.getpid()}-{next(_buckets)}"
    filesystem = _s3_filesystem(server)
    filesystem.create_dir(bucket)
    try:
        yield LakeConfig("s3", _s3_values(server, bucket, "quotes"), server)
    finally:
        filesystem.delete_dir(bucket)


@pytest.fixture
def lake(lake_config: LakeConfig) -> Lake:
    """The ``Lake`` of ``lake_config`` (a local directory or an S3 prefix), empty."""
    return lake_config.open()
