"""The writer's transactions: a batch and its ledger entry, committed together or not at all.

The ledger (``orderbook_write_batches``) is what makes replays exactly-once: a batch's id is
inserted first, with ``ON CONFLICT DO NOTHING``, in the same transaction as its rows; a batch
whose id is already there was committed before and is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from sqlalchemy import bindparam, delete, func
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.models import WriteBatch
from orderbook_store.pg.connection import copy_quotes_in, raw_connection
from orderbook_store.pg.copy_in import copy_lines, encode_copy_text
from orderbook_store.quote import QuoteRow
from orderbook_store.write.careful import CopySizer, Refused, Timed, copy_bisecting
from orderbook_store.write.failures import Failure

__all__ = ["prune_ledger", "stream_copy_text", "write_batch", "write_batch_carefully"]

#: Rows encoded per COPY data message when a batch is streamed from memory.
COPY_CHUNK_ROWS = 4096

#: Called with (batch id, the batch's COPY lines, the refused rows) before the batch commits.
KeepRefused = Callable[[uuid.UUID, list[bytes], list[Refused]], Awaitable[None]]

_LEDGER_INSERT = (
    pg_insert(WriteBatch)
    .values(batch_id=bindparam("batch_id"), rows=bindparam("rows"))
    .on_conflict_do_nothing(index_elements=[WriteBatch.batch_id])
    .returning(WriteBatch.batch_id)
)
_LEDGER_PRUNE = delete(WriteBatch).where(
    WriteBatch.committed_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, bindparam("secs"))
)


async def write_batch(
    engine: AsyncEngine, batch_id: uuid.UUID, rows: int, data: bytes | AsyncIterator[bytes]
) -> bool:
    """One COPY of the batch with its ledger entry; False if the ledger already had it."""
    async with engine.connect() as conn:
        try:
            async with conn.begin():
                inserted = await conn.execute(_LEDGER_INSERT, {"batch_id": batch_id, "rows": rows})
                if inserted.first() is None:
                    return False
                await copy_quotes_in(conn, data)
            return True
        except BaseException:
            # The connection may be broken mid-protocol: never hand it back to the pool.
            with contextlib.suppress(Exception):
                await conn.invalidate()
            raise


async def write_batch_carefully(
    engine: AsyncEngine,
    batch_id: uuid.UUID,
    data: bytes,
    sizer: CopySizer,
    classify: Callable[[BaseException], Failure],
    keep_refused: KeepRefused,
    timed: Timed,
) -> int | None:
    """The batch in one transaction as COPY statements small enough to fit, refused rows
    set aside (``write.careful``) and handed to ``keep_refused`` before the commit.

    Returns how many rows were refused, or None if the ledger already had the batch. Every
    statement is bounded by ``timed`` (the transaction as a whole is not: finding many refused
    rows takes many statements). Other failures abort the whole transaction and are raised.
    """
    lines = copy_lines(data)
    async with engine.connect() as conn:
        try:
            transaction = await timed(conn.begin(), 0)
            inserted = await timed(
                conn.execute(_LEDGER_INSERT, {"batch_id": batch_id, "rows": len(lines)}), 0
            )
            if inserted.first() is None:
                await timed(transaction.rollback(), 0)
                return None
            raw = await raw_connection(conn)
            # A deferred constraint would refuse at COMMIT, where no row can be set aside.
            await timed(raw.execute("SET CONSTRAINTS ALL IMMEDIATE"), 0)
            refused = await copy_bisecting(raw, lines, sizer, classify, timed)
            if refused:
                await keep_refused(batch_id, lines, refused)
            await timed(transaction.commit(), len(lines))
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            raise
    return len(refused)


async def prune_ledger(engine: AsyncEngine, retention_s: float) -> int:
    """Delete ledger entries older than ``retention_s``; returns how many."""
    async with engine.begin() as conn:
        result = await conn.execute(_LEDGER_PRUNE, {"secs": retention_s})
    return int(result.rowcount or 0)


async def stream_copy_text(rows: list[QuoteRow]) -> AsyncIterator[bytes]:
    """COPY text of ``rows`` in pieces, so the server inserts while the rest is encoded.

    Between pieces the event loop gets a turn: a big batch never holds up ``add`` callers
    (or the collector's websocket) for longer than one piece takes to encode.
    """
    for start in range(0, len(rows), COPY_CHUNK_ROWS):
        if start:
            await asyncio.sleep(0)
        yield encode_copy_text(rows[start : start + COPY_CHUNK_ROWS])
