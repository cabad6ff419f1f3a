"""The one way a read touches the database: a pooled connection in a read-only snapshot.

Every read runs in one ``REPEATABLE READ, READ ONLY`` transaction, so all its statements see
the same rows. A database that lacks the table (never migrated, or the settings name another
database) is told apart here from every other failure: it becomes one ``SchemaNotMigrated``
naming the command that fixes it, instead of the driver's ``UndefinedTableError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.errors import SchemaNotMigrated
from orderbook_store.models import OrderbookData
from orderbook_store.pg.connection import raw_connection

__all__ = ["read_snapshot", "schema_not_migrated"]


def schema_not_migrated(engine: AsyncEngine) -> SchemaNotMigrated:
    """The error for a read of a database without the table (names the database, no secret)."""
    return SchemaNotMigrated(
        f"the database {engine.url.database!r} has no {OrderbookData.__tablename__} table: "
        "it was never migrated; run `orderbook-store upgrade` (or `alembic upgrade head`) "
        "with the same settings"
    )


@contextlib.asynccontextmanager
async def read_snapshot(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """The asyncpg connection of a pooled connection, inside a read-only snapshot
    transaction that ends (and returns the connection) when the block does."""
    try:
        async with engine.connect() as conn:
            raw = await raw_connection(conn)
            async with raw.transaction(isolation="repeatable_read", readonly=True):
                yield raw
    except asyncpg.UndefinedTableError:
        raise schema_not_migrated(engine) from None
