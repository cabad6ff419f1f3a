"""``OrderbookRepository``: the single face over the ``orderbook_data`` table.

Writes and reads have their own engines underneath (``writer.Writer`` and ``reader.Reader``);
callers only ever see the plain method names here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from .engine import settings_of
from .models import QUOTE_COLUMNS, OrderbookData
from .settings import Settings


class OrderbookRepository:
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

    async def close(self) -> None:
        """Flush what is buffered and release resources."""

    # -- bulk writes ---------------------------------------------------------------------

    async def insert_many(self, rows: Iterable[Mapping[str, Any] | Any]) -> int:
        """Write ``rows`` now, ``batch_size`` rows per transaction; returns rows written."""
        batch: list[dict[str, Any]] = []
        written = 0
        for row in rows:
            values = row if isinstance(row, Mapping) else row.model_dump()
            batch.append({column: values[column] for column in QUOTE_COLUMNS if column in values})
            if len(batch) >= self.settings.batch_size:
                written += await self._insert_batch(batch)
                batch = []
        if batch:
            written += await self._insert_batch(batch)
        return written

    async def _insert_batch(self, batch: list[dict[str, Any]]) -> int:
        async with self.engine.begin() as conn:
            await conn.execute(insert(OrderbookData), batch)
        return len(batch)

    async def count(self, symbol: str | None = None) -> int:
        """Number of stored quotes, for one symbol or all (an exact ``count(*)``)."""
        query = select(func.count()).select_from(OrderbookData)
        if symbol is not None:
            query = query.where(OrderbookData.symbol == symbol)
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())
