"""``OrderbookRepository``: the single face over the ``orderbook_data`` table.

Writes and reads have their own engines underneath (``writer.Writer`` and ``reader.Reader``);
callers only ever see the plain method names here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, overload

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from .engine import settings_of
from .models import QUOTE_COLUMNS, OrderbookData
from .reader import Frame, Output, Reader, TimeLike
from .settings import Settings

if TYPE_CHECKING:
    import pandas as pd


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

    # -- reads (reader.Reader) -----------------------------------------------------------

    @property
    def _read_path(self) -> Reader:
        reader = self.__dict__.get("_reader")
        if reader is None:
            reader = self.__dict__["_reader"] = Reader(self.engine)
        return reader

    @overload
    async def quotes(
        self,
        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: Literal["pandas"] = "pandas",
        exact: bool = False,
    ) -> pd.DataFrame: ...

    @overload
    async def quotes(
        self,
        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: Output,
        exact: bool = False,
    ) -> Frame: ...

    async def quotes(
        self,
        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: Output = "pandas",
        exact: bool = False,
    ) -> Frame:
        """Quotes of ``symbols`` in ``[start, end)`` as pandas/polars/Arrow/numpy; see
        ``Reader.quotes`` (float64 prices, or ``Decimal`` with ``exact=True``)."""
        return await self._read_path.quotes(
            symbols, start, end, exchange=exchange, columns=columns, output=output, exact=exact
        )

    def iter_quotes(
        self,
        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        chunk_rows: int = 1_000_000,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: Output = "pandas",
        exact: bool = False,
    ) -> AsyncIterator[Frame]:
        """``quotes()`` in frames of at most ``chunk_rows`` rows, memory flat; see
        ``Reader.iter_quotes``."""
        return self._read_path.iter_quotes(
            symbols,
            start,
            end,
            chunk_rows=chunk_rows,
            exchange=exchange,
            columns=columns,
            output=output,
            exact=exact,
        )

    @overload
    async def latest(
        self,
        symbols: str | Iterable[str] | None = None,
        *,
        output: Literal["pandas"] = "pandas",
        exact: bool = False,
    ) -> pd.DataFrame: ...

    @overload
    async def latest(
        self, symbols: str | Iterable[str] | None = None, *, output: Output, exact: bool = False
    ) -> Frame: ...

    async def latest(
        self,
        symbols: str | Iterable[str] | None = None,
        *,
        output: Output = "pandas",
        exact: bool = False,
    ) -> Frame:
        """The last quote of each symbol (all symbols when None); see ``Reader.latest``."""
        return await self._read_path.latest(symbols, output=output, exact=exact)

    @overload
    async def asof(
        self,
        symbol: str,
        times: Iterable[TimeLike] | TimeLike,
        *,
        exchange: str | None = None,
        output: Literal["pandas"] = "pandas",
        exact: bool = False,
    ) -> pd.DataFrame: ...

    @overload
    async def asof(
        self,
        symbol: str,
        times: Iterable[TimeLike] | TimeLike,
        *,
        exchange: str | None = None,
        output: Output,
        exact: bool = False,
    ) -> Frame: ...

    async def asof(
        self,
        symbol: str,
        times: Iterable[TimeLike] | TimeLike,
        *,
        exchange: str | None = None,
        output: Output = "pandas",
        exact: bool = False,
    ) -> Frame:
        """The quote in force at each of ``times``; see ``Reader.asof``."""
        return await self._read_path.asof(
            symbol, times, exchange=exchange, output=output, exact=exact
        )

    @overload
    async def resample(
        self,
        symbol: str,
        start: TimeLike,
        end: TimeLike,
        freq: str | dt.timedelta | int = "1min",
        *,
        exchange: str | None = None,
        output: Literal["pandas"] = "pandas",
    ) -> pd.DataFrame: ...

    @overload
    async def resample(
        self,
        symbol: str,
        start: TimeLike,
        end: TimeLike,
        freq: str | dt.timedelta | int = "1min",
        *,
        exchange: str | None = None,
        output: Output,
    ) -> Frame: ...

    async def resample(
        self,
        symbol: str,
        start: TimeLike,
        end: TimeLike,
        freq: str | dt.timedelta | int = "1min",
        *,
        exchange: str | None = None,
        output: Output = "pandas",
    ) -> Frame:
        """Per-bucket OHLC of the mid, last bid/ask, mean spread, count; see
        ``Reader.resample``."""
        return await self._read_path.resample(
            symbol, start, end, freq, exchange=exchange, output=output
        )
