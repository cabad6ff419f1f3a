"""The read API of ``OrderbookStore``: ``read.api``'s methods, synchronous.

Generated with ``read.api`` by ``python -m orderbook_store.read._generate_api``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from typing_extensions import overload  # registered for get_overloads on every Python

from orderbook_store.read.api import NumpyColumns
from orderbook_store.read.plan import Frame, Output
from orderbook_store.times import TimeLike

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl
    import pyarrow as pa

    from orderbook_store.read.api import AsyncReads

__all__ = ["SyncReads"]

T = TypeVar("T")


class SyncReads:
    """The read methods of a synchronous face: each runs its ``AsyncReads`` twin to completion.

    The face provides ``_async_reads()`` (its asynchronous twin), ``_call`` (runs a coroutine
    and returns its result) and ``_iterate`` (turns an async iterator into a blocking one).
    """

    def _async_reads(self) -> AsyncReads:
        raise NotImplementedError

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        raise NotImplementedError

    def _iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        raise NotImplementedError

    @overload
    def quotes(
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
    def quotes(
        self,
        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: Literal["polars"],
        exact: bool = False,
    ) -> pl.DataFrame: ...

    @overload
    def quotes(
        self,
        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: Literal["arrow"],
        exact: bool = False,
    ) -> pa.Table: ...

    @overload
    def quotes(
        self,
        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: Literal["numpy"],
        exact: bool = False,
    ) -> NumpyColumns: ...

    @overload
    def quotes(
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

    def quotes(
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
        """Quotes of ``symbols`` with ``start <= timestamp < end``, ordered by symbol, time and
        id: float64 prices (``Decimal`` with ``exact=True``), times as ``datetime64[us, UTC]``.
        See ``orderbook_store.read.reader.Reader.quotes`` for what it costs."""
        return self._call(
            self._async_reads().quotes(
                symbols, start, end, exchange=exchange, columns=columns, output=output, exact=exact
            )
        )

    @overload
    def iter_quotes(
        self,
        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        chunk_rows: int = 1_000_000,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: Literal["pandas"] = "pandas",
        exact: bool = False,
    ) -> Iterator[pd.DataFrame]: ...

    @overload
    def iter_quotes(
        self,
        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        chunk_rows: int = 1_000_000,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: Literal["polars"],
        exact: bool = False,
    ) -> Iterator[pl.DataFrame]: ...

    @overload
    def iter_quotes(
        self,
        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        chunk_rows: int = 1_000_000,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: Literal["arrow"],
        exact: bool = False,
    ) -> Iterator[pa.Table]: ...

    @overload
    def iter_quotes(
        self,
        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        chunk_rows: int = 1_000_000,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: Literal["numpy"],
        exact: bool = False,
    ) -> Iterator[NumpyColumns]: ...

    @overload
    def iter_quotes(
        self,
        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        chunk_rows: int = 1_000_000,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: Output,
        exact: bool = False,
    ) -> Iterator[Frame]: ...

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
    ) -> Iterator[Frame]:
        """``quotes()`` as frames of at most ``chunk_rows`` rows each, memory flat."""
        return self._iterate(
            self._async_reads().iter_quotes(
                symbols,
                start,
                end,
                chunk_rows=chunk_rows,
                exchange=exchange,
                columns=columns,
                output=output,
                exact=exact,
            )
        )

    @overload
    def latest(
        self,
        symbols: str | Iterable[str] | None = None,
        *,
        output: Literal["pandas"] = "pandas",
        exact: bool = False,
    ) -> pd.DataFrame: ...

    @overload
    def latest(
        self,
        symbols: str | Iterable[str] | None = None,
        *,
        output: Literal["polars"],
        exact: bool = False,
    ) -> pl.DataFrame: ...

    @overload
    def latest(
        self,
        symbols: str | Iterable[str] | None = None,
        *,
        output: Literal["arrow"],
        exact: bool = False,
    ) -> pa.Table: ...

    @overload
    def latest(
        self,
        symbols: str | Iterable[str] | None = None,
        *,
        output: Literal["numpy"],
        exact: bool = False,
    ) -> NumpyColumns: ...

    @overload
    def latest(
        self,
        symbols: str | Iterable[str] | None = None,
        *,
        output: Output,
        exact: bool = False,
    ) -> Frame: ...

    def latest(
        self,
        symbols: str | Iterable[str] | None = None,
        *,
        output: Output = "pandas",
        exact: bool = False,
    ) -> Frame:
        """The last quote of each symbol (every stored symbol when ``symbols`` is None)."""
        return self._call(self._async_reads().latest(symbols, output=output, exact=exact))

    @overload
    def asof(
        self,
        symbol: str,
        times: Iterable[TimeLike] | TimeLike,
        *,
        exchange: str | None = None,
        output: Literal["pandas"] = "pandas",
        exact: bool = False,
    ) -> pd.DataFrame: ...

    @overload
    def asof(
        self,
        symbol: str,
        times: Iterable[TimeLike] | TimeLike,
        *,
        exchange: str | None = None,
        output: Literal["polars"],
        exact: bool = False,
    ) -> pl.DataFrame: ...

    @overload
    def asof(
        self,
        symbol: str,
        times: Iterable[TimeLike] | TimeLike,
        *,
        exchange: str | None = None,
        output: Literal["arrow"],
        exact: bool = False,
    ) -> pa.Table: ...

    @overload
    def asof(
        self,
        symbol: str,
        times: Iterable[TimeLike] | TimeLike,
        *,
        exchange: str | None = None,
        output: Literal["numpy"],
        exact: bool = False,
    ) -> NumpyColumns: ...

    @overload
    def asof(
        self,
        symbol: str,
        times: Iterable[TimeLike] | TimeLike,
        *,
        exchange: str | None = None,
        output: Output,
        exact: bool = False,
    ) -> Frame: ...

    def asof(
        self,
        symbol: str,
        times: Iterable[TimeLike] | TimeLike,
        *,
        exchange: str | None = None,
        output: Output = "pandas",
        exact: bool = False,
    ) -> Frame:
        """The quote in force at each of ``times`` (``merge_asof``, backward), one row each."""
        return self._call(
            self._async_reads().asof(symbol, times, exchange=exchange, output=output, exact=exact)
        )

    @overload
    def resample(
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
    def resample(
        self,
        symbol: str,
        start: TimeLike,
        end: TimeLike,
        freq: str | dt.timedelta | int = "1min",
        *,
        exchange: str | None = None,
        output: Literal["polars"],
    ) -> pl.DataFrame: ...

    @overload
    def resample(
        self,
        symbol: str,
        start: TimeLike,
        end: TimeLike,
        freq: str | dt.timedelta | int = "1min",
        *,
        exchange: str | None = None,
        output: Literal["arrow"],
    ) -> pa.Table: ...

    @overload
    def resample(
        self,
        symbol: str,
        start: TimeLike,
        end: TimeLike,
        freq: str | dt.timedelta | int = "1min",
        *,
        exchange: str | None = None,
        output: Literal["numpy"],
    ) -> NumpyColumns: ...

    @overload
    def resample(
        self,
        symbol: str,
        start: TimeLike,
        end: TimeLike,
        freq: str | dt.timedelta | int = "1min",
        *,
        exchange: str | None = None,
        output: Output,
    ) -> Frame: ...

    def resample(
        self,
        symbol: str,
        start: TimeLike,
        end: TimeLike,
        freq: str | dt.timedelta | int = "1min",
        *,
        exchange: str | None = None,
        output: Output = "pandas",
    ) -> Frame:
        """Per bucket of ``freq``: OHLC of the mid, last bid and ask, mean spread, count.
        ``freq`` is a fixed width as pandas spells it (``"100ms"``, ``"5s"``, ``"1min"``,
        ``"1h"``, ``"1D"``), a timedelta or int µs; calendar ones (``"M"``, ``"Y"``...) are
        refused."""
        return self._call(
            self._async_reads().resample(symbol, start, end, freq, exchange=exchange, output=output)
        )
