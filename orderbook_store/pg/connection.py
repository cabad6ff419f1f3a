"""The asyncpg connection under SQLAlchemy's, and COPY of quote rows into the table.

SQLAlchemy wraps neither COPY direction, so every path that uses COPY (the writer, bulk
inserts, the importers, export, the reader, archiving) reaches the driver connection here,
and every COPY *into* ``orderbook_data`` goes through :func:`copy_quotes_in`.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Literal

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection

from orderbook_store.models import QUOTE_COLUMNS, OrderbookData

__all__ = ["copy_quotes_in", "raw_connection"]


async def raw_connection(conn: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under ``conn``, in ``conn``'s transaction (if it began one)."""
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    return raw


async def copy_quotes_in(
    target: AsyncConnection | asyncpg.Connection,
    data: bytes | AsyncIterable[bytes],
    *,
    format: Literal["text", "csv"] = "text",
) -> None:
    """``COPY orderbook_data (QUOTE_COLUMNS) FROM STDIN`` of ``data`` on ``target``.

    ``data`` is COPY text (``pg.copy_in.encode_copy_text``) or CSV, as bytes or an async
    iterable of bytes (streamed while the server inserts). One COPY statement is atomic; on a
    SQLAlchemy connection it runs in that connection's transaction, which must already have
    begun (execute something first: the asyncpg dialect begins lazily).
    """
    raw = await raw_connection(target) if isinstance(target, AsyncConnection) else target
    # A memoryview, because asyncpg would take plain bytes for a file *path*.
    source = memoryview(data) if isinstance(data, bytes) else data
    await raw.copy_to_table(
        OrderbookData.__tablename__, source=source, columns=list(QUOTE_COLUMNS), format=format
    )
