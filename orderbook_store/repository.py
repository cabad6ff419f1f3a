"""``OrderbookRepository``: the single face over the ``orderbook_data`` table.

Writes and reads have their own engines underneath (``writer.Writer`` and ``reader.Reader``);
callers only ever see the plain method names here.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.engine import create_read_engine, settings_of
from orderbook_store.models import OrderbookData
from orderbook_store.pg.connection import copy_quotes_in
from orderbook_store.pg.copy_in import encode_copy_text
from orderbook_store.quote import Quote, to_row
from orderbook_store.read.api import AsyncReads
from orderbook_store.read.reader import Reader
from orderbook_store.settings import Settings
from orderbook_store.write.writer import Writer, WriterStats

if TYPE_CHECKING:
    pass

#: Rows per COPY data chunk in ``insert_many``: big enough to amortise, small enough to stream.
_INSERT_CHUNK_ROWS = 10_000


class OrderbookRepository(AsyncReads):
    """Async access to quotes: buffered writes for collectors, bulk writes, range reads.

    Use as ``async with OrderbookRepository(engine) as repo: ...``; leaving the block flushes
    every quote added. Options default to the engine's ``Settings``.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        settings: Settings | None = None,
        batch_size: int | None = None,
        flush_interval_s: float | None = None,
        max_pending: int | None = None,
        spool_dir: str | Path | None = None,
    ) -> None:
        base = settings if settings is not None else settings_of(engine)
        overrides: dict[str, Any] = {
            "batch_size": batch_size,
            "flush_interval_s": flush_interval_s,
            "max_pending": max_pending,
            "spool_dir": Path(spool_dir) if spool_dir is not None else None,
        }
        self.engine = engine
        self.settings = base.model_copy(
            update={k: v for k, v in overrides.items() if v is not None}
        )

    async def __aenter__(self) -> OrderbookRepository:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, timeout_s: float | None = None) -> None:
        """Flush what is buffered (up to ``timeout_s``, default 30 s) and stop the writer.

        Rows that cannot be written in time stay in the durable spool and are written at the
        next start; one log line says how many and where. Never raises for an unreachable
        server; raises ``WritesBlocked`` when a configuration failure (password, privileges,
        missing schema, TLS) kept rows from the table, naming the fix, and ``RowsLost`` with
        the count if rows could be neither written nor spooled. A repository that never wrote
        touches neither the database nor the spool.
        """
        try:
            if self._writer is not None:
                await self._writer.close(timeout_s)
        finally:
            if self._read_engine is not None:
                await self._read_engine.dispose()
                self._read_engine = self._reader = None

    # -- buffered writes (the collector's path; see orderbook_store.write.writer) ---------------

    _writer: Writer | None = None

    def _write_path(self) -> Writer:
        writer = self._writer
        if writer is None:
            writer = self._writer = Writer(self.engine, self.settings)
        return writer

    async def add(self, quote: Quote | Mapping[str, object]) -> None:
        """Validate one quote and buffer it; returns at once, never waiting for the database.

        ``quote`` is a ``Quote`` or a mapping with the table's column names. Costs about a
        microsecond or two. Raises ``InvalidQuote`` (naming the field and value) for a quote
        that breaks a rule; nothing else is affected. Buffered quotes are written in the
        background by COPY, at least every ``flush_interval_s``. A quote ``add`` returned for
        is written by the time ``close()`` returns, or kept in the spool. Raises
        ``WriterClosed`` once ``close()`` has begun, and ``WriterBackpressure`` when
        ``max_pending`` rows are held and the spool cannot take them; that quote was not taken.
        Crossed quotes (ask below bid) are accepted: real feeds have them for an instant.
        """
        writer = self._writer
        if writer is None:
            writer = self._write_path()
        await writer.add(quote)

    async def add_many(self, quotes: Iterable[Quote | Mapping[str, object]]) -> int:
        """``add`` every quote; returns how many were buffered.

        Valid quotes are all buffered; if any were invalid, the first ``InvalidQuote`` is
        raised afterwards (``stats().rows_rejected`` counts them).
        """
        return await self._write_path().add_many(quotes)

    async def flush(self, timeout_s: float | None = None) -> None:
        """Return once every quote added before this call is committed (and, on first use,
        what an earlier process left in the spool).

        Without a timeout this waits for as long as the server is away. With ``timeout_s``,
        if it passes first, the rows are made durable in the spool and ``DatabaseUnavailable``
        is raised; they are written when the server answers, by this process or the next.
        """
        await self._write_path().flush(timeout_s)

    def stats(self) -> WriterStats:
        """The writer's counters: rows added, written, spooled, replayed, rejected, refused,
        retries, batches, batch write latency (last, p50, p99) and the last error. No I/O."""
        return self._write_path().stats()

    @property
    def writes_blocked(self) -> str | None:
        """Why writes are failing for a reason that needs a fix, with the fix; else ``None``.

        Set while the server refuses the writer (password, privileges, missing schema, TLS,
        read-only node); the rows are kept meanwhile. Costs an attribute lookup.
        """
        return self._writer.writes_blocked if self._writer is not None else None

    @property
    def dead_letter_path(self) -> Path:
        """The file rows the server refused are kept in (``orderbook_store.write.dead_letters``)."""
        return self._write_path().dead_letter_path

    @property
    def writer(self) -> Writer:
        """The buffered writer behind ``add`` (made here if ``add`` has not made it yet), for
        monitoring: its ``stats()`` and ``commit_times`` (see ``orderbook_store.metrics``).
        Making it touches neither the database nor the spool."""
        return self._write_path()

    # -- bulk writes ---------------------------------------------------------------------

    async def insert_many(self, rows: Iterable[Quote | Mapping[str, Any]]) -> int:
        """Write ``rows`` now with one COPY; returns rows written. All or nothing.

        Rows are validated like ``add`` (an invalid one raises ``InvalidQuote`` and nothing is
        written) and streamed to the server in chunks while it inserts, so memory stays flat
        for any number of rows. Bypasses the buffer, the spool and the ledger: a failure
        raises to the caller, who knows what to retry.
        """
        iterator = iter(rows)
        written = 0

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal written
            take = itertools.islice
            while True:
                chunk = [to_row(row) for row in take(iterator, _INSERT_CHUNK_ROWS)]
                if not chunk:
                    return
                written += len(chunk)
                yield encode_copy_text(chunk)

        async with self.engine.connect() as conn:
            try:
                # One COPY statement is atomic on its own: no explicit transaction needed.
                await copy_quotes_in(conn, chunks())
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.invalidate()
                raise
        return written

    async def count(self, symbol: str | None = None) -> int:
        """Number of stored quotes, for one symbol or all (an exact ``count(*)``)."""
        query = select(func.count()).select_from(OrderbookData)
        if symbol is not None:
            query = query.where(OrderbookData.symbol == symbol)
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    # -- reads (reader.Reader) -----------------------------------------------------------

    _reader: Reader | None = None
    #: Owned by the repository, only when reads go to a read-only node (DB_READ_URL/HOST);
    #: writes and ``count`` stay on ``self.engine``, the primary.
    _read_engine: AsyncEngine | None = None

    @property
    def _read_path(self) -> Reader:
        reader = self._reader
        if reader is None:
            if self.settings.read_settings() is not None:
                self._read_engine = create_read_engine(self.settings)
            reader = self._reader = Reader(self._read_engine or self.engine, settings=self.settings)
        return reader

    def _reads(self) -> Reader:
        return self._read_path
