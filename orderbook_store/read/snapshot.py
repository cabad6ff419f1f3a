"""The one way a read touches the database: a pooled connection in a read-only snapshot.

Every read runs in one ``REPEATABLE READ, READ ONLY`` transaction, so all its statements see the
same rows, with the table locked ``ACCESS SHARE`` before the snapshot is taken (so the lake
catalog and the partitions agree: see ``read.tiers``). A database that lacks the table (never
migrated, or the settings name another database) is told apart here from every other failure: it
becomes one ``SchemaNotMigrated`` naming the command that fixes it, instead of the driver's
``UndefinedTableError``.
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


#: The transaction, and the table locked ``ACCESS SHARE`` before any statement takes the
#: snapshot, in one round trip: a partition detached and dropped by ``prune`` (with its range
#: recorded as in the lake) is either gone in the snapshot's catalog or waits for the read.
#: ``ONLY``: detaching locks the parent, so the parent suffices; locking every partition would
#: take one lock per partition (hundreds) on every read.
_BEGIN_SQL = (
    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;"
    f" LOCK TABLE ONLY {OrderbookData.__tablename__} IN ACCESS SHARE MODE"
)


@contextlib.asynccontextmanager
async def read_snapshot(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """The asyncpg connection of a pooled connection, inside a read-only snapshot
    transaction, the table locked (see ``_BEGIN_SQL``), that ends (and returns the
    connection) when the block does. A connection that cannot be rolled back after a
    failure is dropped from the pool instead of returned to it."""
    try:
        async with engine.connect() as conn:
            raw = await raw_connection(conn)
            try:
                await raw.execute(_BEGIN_SQL)
                yield raw
            except BaseException:
                try:
                    await raw.execute("ROLLBACK")
                except BaseException:
                    with contextlib.suppress(Exception):
                        await conn.invalidate()
                raise
            await raw.execute("COMMIT")
    except asyncpg.UndefinedTableError:
        raise schema_not_migrated(engine) from None
