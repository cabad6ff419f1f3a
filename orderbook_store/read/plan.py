"""A range read, checked and planned: which symbols, columns and bounds, and the SQL for them.

COPY cannot take bind parameters, and user strings never become SQL text: the symbol and
exchange are bound with ``set_config(..., is_local => true)`` and read back by the COPY query
with ``current_setting(...)``; the time bounds are validated ``int``s written as literals, so
the planner prunes date partitions at plan time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

import numpy as np

from orderbook_store.errors import InvalidArgument
from orderbook_store.models import (
    DECIMAL_COLUMNS,
    EXCHANGE_MAX_CHARS,
    QUOTE_COLUMNS,
    SYMBOL_MAX_CHARS,
)
from orderbook_store.pg.copy_out import ColumnKind
from orderbook_store.times import to_epoch_us

if TYPE_CHECKING:
    pass


Output = Literal["pandas", "polars", "arrow", "numpy"]
OUTPUT_FORMATS: tuple[str, ...] = ("pandas", "polars", "arrow", "numpy")
#: What ``columns=`` may name: the quote columns plus the row ``id``.
READ_COLUMNS: tuple[str, ...] = ("id", *QUOTE_COLUMNS)
#: pandas.DataFrame, polars.DataFrame, pyarrow.Table or dict[str, numpy.ndarray].
Frame: TypeAlias = object

_TIME_COLUMNS = frozenset({"timestamp", "local_timestamp", "time", "bucket"})
_TEXT_COLUMNS = frozenset({"exchange", "symbol"})
_NAT = np.iinfo(np.int64).min  # numpy's NaT, as int64: a missing time

# The statement that binds this read's values; COPY below reads them back. The planner knobs
# keep the ordered index scan (a bitmap scan plus a full sort is what the planner picks for
# large ranges, and is slower) and turn JIT off (its compile time is pure loss here).
_BIND_SQL = (
    "SELECT set_config('orderbook_store.symbol', $1, true),"
    " set_config('orderbook_store.exchange', $2, true),"
    " set_config('jit', 'off', true),"
    " set_config('enable_bitmapscan', 'off', true),"
    " set_config('enable_seqscan', 'off', true)"
)
_WHERE_SQL = (
    " FROM orderbook_data"
    " WHERE symbol = current_setting('orderbook_store.symbol')"
    " AND timestamp >= {start_us:d} AND timestamp < {end_us:d}"
)
_EXCHANGE_SQL = " AND exchange = current_setting('orderbook_store.exchange')"
_RANGE_SQL = (
    " FROM orderbook_data WHERE symbol = $1 AND timestamp >= $2::bigint"
    " AND timestamp < $3::bigint AND ($4::text IS NULL OR exchange = $4::text)"
)
#: The planner's row estimate for a range (bound values, so a custom plan: a real estimate).
_ESTIMATE_SQL = "EXPLAIN (FORMAT JSON) SELECT 1" + _RANGE_SQL


def _bounds_sql(start_us: int, end_us: int) -> str:
    """First and last timestamp of ``$1``'s quotes (exchange ``$2``, or any) in
    ``[start_us, end_us)``: two index probes.

    The bounds are literals, as in ``copy_sql``: the partitions outside them are pruned when
    the statement is planned. (As parameters, a cached generic plan would hold every partition,
    and building it once took ~300 ms with 365 daily partitions.)
    """
    where = (
        f" FROM orderbook_data WHERE symbol = $1 AND timestamp >= {int(start_us):d}"
        f" AND timestamp < {int(end_us):d} AND ($2::text IS NULL OR exchange = $2::text)"
    )
    return (
        f"SELECT (SELECT timestamp{where} ORDER BY symbol, timestamp LIMIT 1) AS first,"
        f" (SELECT timestamp{where} ORDER BY symbol DESC, timestamp DESC LIMIT 1) AS last"
    )


@dataclass(frozen=True)
class _Plan:
    """What one range read sends and returns, after validation."""

    symbols: tuple[str, ...]  # the ones that can exist, in output order
    start_us: int
    end_us: int
    exchange: str | None
    columns: tuple[str, ...]
    output: Output
    exact: bool

    @property
    def copy_columns(self) -> tuple[str, ...]:
        """Columns the COPY sends: timestamp and id first (for the order check), then values."""
        wanted = [c for c in self.columns if c not in ("symbol", "timestamp", "id")]
        if self.exchange is not None and "exchange" in wanted:
            wanted.remove("exchange")  # constant: filled in on the client
        return ("timestamp", "id", *wanted)

    @property
    def kinds(self) -> tuple[ColumnKind, ...]:
        return tuple(_kind(c) for c in self.copy_columns)

    def copy_sql(
        self, *, order_by_id: bool, start_us: int | None = None, end_us: int | None = None
    ) -> str:
        """The COPY query for ``[start_us, end_us)`` (the plan's range by default).

        The bounds go in as literals (``int`` only, formatted with ``:d``): see the module doc.
        """
        exchange = _EXCHANGE_SQL if self.exchange is not None else ""
        order = "timestamp, id" if order_by_id else "timestamp"
        select = ", ".join(self.copy_columns)
        where = _WHERE_SQL.format(
            start_us=int(self.start_us if start_us is None else start_us),
            end_us=int(self.end_us if end_us is None else end_us),
        )
        # asyncpg's copy_from_query wraps this in COPY (...) TO STDOUT.
        return f"SELECT {select}{where}{exchange} ORDER BY {order}"

    def bind_args(self, symbol: str) -> tuple[str, str]:
        """Values ``_BIND_SQL`` binds for a read of ``symbol``."""
        return (symbol, self.exchange or "")


@dataclass(frozen=True)
class _Part:
    """One COPY of a range read: a symbol and a sub-range of the requested times."""

    symbol: str
    start_us: int
    end_us: int


def _kind(column: str) -> ColumnKind:
    if column in DECIMAL_COLUMNS:
        return ColumnKind.NUMERIC
    if column in _TEXT_COLUMNS:
        return ColumnKind.TEXT
    return ColumnKind.INT8


def _check_symbol(symbol: object) -> str:
    if not isinstance(symbol, str) or not symbol:
        raise InvalidArgument(f"symbol={symbol!r} must be a non-empty string")
    if "\x00" in symbol:
        raise InvalidArgument(f"symbol={symbol!r} contains NUL, which PostgreSQL text cannot hold")
    try:
        symbol.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"symbol={symbol!r} is not valid Unicode text") from None
    return symbol


def _symbol_list(symbols: str | Iterable[str] | None) -> list[str]:
    if symbols is None:
        return []
    if isinstance(symbols, str):
        return [_check_symbol(symbols)]
    if not isinstance(symbols, Iterable):
        raise InvalidArgument(f"symbols={symbols!r} must be a string or a list of strings")
    checked = [_check_symbol(s) for s in symbols]
    if not checked:
        raise InvalidArgument("symbols=[] names no symbol")
    return checked


def _check_output(output: object) -> Output:
    if output not in OUTPUT_FORMATS:
        raise InvalidArgument(f"output={output!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    return output  # type: ignore[return-value]


def _check_exchange(exchange: object) -> str | None:
    if exchange is None:
        return None
    if not isinstance(exchange, str) or not exchange or "\x00" in exchange:
        raise InvalidArgument(f"exchange={exchange!r} must be a non-empty string without NUL")
    try:
        exchange.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"exchange={exchange!r} is not valid Unicode text") from None
    return exchange


def _check_columns(columns: Sequence[str] | None) -> tuple[str, ...]:
    if columns is None:
        return QUOTE_COLUMNS
    if isinstance(columns, str):
        columns = [columns]
    if not isinstance(columns, Iterable):
        raise InvalidArgument(f"columns={columns!r} must be a list of column names")
    chosen = tuple(columns)
    for column in chosen:
        if column not in READ_COLUMNS:
            raise InvalidArgument(f"columns: {column!r} is not one of {', '.join(READ_COLUMNS)}")
    if not chosen or len(set(chosen)) != len(chosen):
        raise InvalidArgument(f"columns={list(chosen)!r} must name each column once")
    return chosen


def plan_quotes(
    symbols: str | Iterable[str],
    start: object,
    end: object,
    *,
    exchange: str | None = None,
    columns: Sequence[str] | None = None,
    output: str = "pandas",
    exact: bool = False,
) -> _Plan:
    """Validate a range read's arguments (``ValueError`` naming the bad value)."""
    if symbols is None:
        raise InvalidArgument("symbol=None: name one symbol or a list of them")
    names = _symbol_list(symbols)
    start_us = to_epoch_us(start, "start")
    end_us = to_epoch_us(end, "end")
    if start_us >= end_us:
        raise InvalidArgument(f"start={start!r} must be before end={end!r}")
    checked_output = _check_output(output)
    checked_exchange = _check_exchange(exchange)
    # Unique, in code-point order (the output order); names too long for VARCHAR(20) match
    # nothing, so they are never sent.
    ordered = tuple(s for s in sorted(set(names)) if len(s) <= SYMBOL_MAX_CHARS)
    if checked_exchange is not None and len(checked_exchange) > EXCHANGE_MAX_CHARS:
        ordered = ()
    return _Plan(
        ordered,
        start_us,
        end_us,
        checked_exchange,
        _check_columns(columns),
        checked_output,
        bool(exact),
    )
