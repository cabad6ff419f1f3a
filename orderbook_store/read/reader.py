"""The read path: symbol + time range -> columns, as pandas, polars, Arrow or numpy.

How a range read works, and why:

* One ``COPY (SELECT ...) TO STDOUT`` per symbol, in text format, decoded on the client by
  ``pg.copy_out`` (vectorized numpy). The server sends ``numeric`` as stored (its text form is as
  cheap to produce as binary) instead of casting to ``float8``, which is what bounds connectorx
  and ``read_sql``; floats come out exactly ``float(Decimal(stored value))``.
* COPY cannot take bind parameters, and user strings never become SQL text here: the symbol
  and exchange are *bound* to ``set_config(..., is_local => true)`` in the same read-only
  transaction, and the COPY query reads them back with ``current_setting(...)``. Those are
  stable expressions, so they still drive ``idx_orderbook_symbol_timestamp`` as index
  conditions (see ``explain_quotes``). The time bounds are validated Python ``int``s and are
  written as integer literals: that lets the planner prune date partitions at plan time
  instead of planning every partition and pruning at run time.
* Rows come in index order (symbol, timestamp). Equal timestamps come in heap order, which is
  nearly always id order; the client checks, and re-sorts by (timestamp, id) only when needed.
  That spares the server an Incremental Sort (~15% of its time).
* Each COPY streams: batches of about 2 MB are decoded while the server is still sending, so
  the client's decoding overlaps the server's work on the other core.
* A read the planner expects to hold ``parallel_min_rows`` rows or more is cut at a timestamp
  boundary and read on two pooled connections at once; the second joins the first one's
  transaction snapshot (``pg_export_snapshot``/``SET TRANSACTION SNAPSHOT``), so both see the
  same rows. On a standby, with a busy pool, or when the second connection reaches another
  server, the first connection simply reads everything.

Times: ``start``/``end`` accept aware ``datetime`` (any zone), naive ``datetime`` (taken as
UTC), ISO-8601 strings (naive ones UTC), ``pandas.Timestamp``, ``numpy.datetime64`` (UTC) and
``int`` microseconds since the epoch. The range is half-open ``[start, end)``; sub-microsecond
bounds round up, which keeps it half-open on the stored microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.models import DECIMAL_COLUMNS, QUOTE_COLUMNS
from orderbook_store.pg.copy_out import ColumnKind, DecodedColumn, TextColumn, TextCopyDecoder

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "OUTPUT_FORMATS",
    "READ_COLUMNS",
    "Frame",
    "Output",
    "Reader",
    "TimeLike",
    "parse_freq_us",
    "to_epoch_us",
]

Output = Literal["pandas", "polars", "arrow", "numpy"]
OUTPUT_FORMATS: tuple[str, ...] = ("pandas", "polars", "arrow", "numpy")
#: What ``columns=`` may name: the quote columns plus the row ``id``.
READ_COLUMNS: tuple[str, ...] = ("id", *QUOTE_COLUMNS)
TimeLike: TypeAlias = "dt.datetime | dt.date | str | int | np.datetime64 | np.integer[npt.NBitBase]"
#: pandas.DataFrame, polars.DataFrame, pyarrow.Table or dict[str, numpy.ndarray].
Frame: TypeAlias = object

_TIME_COLUMNS = frozenset({"timestamp", "local_timestamp", "time", "bucket"})
_TEXT_COLUMNS = frozenset({"exchange", "symbol"})
_INT_COLUMNS = frozenset({"id", "quotes"})
_SYMBOL_MAX_CHARS = 20  # VARCHAR(20): a longer symbol cannot be stored, so matches nothing
_EXCHANGE_MAX_CHARS = 50
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_US = dt.timedelta(microseconds=1)
_INT8_MIN, _INT8_MAX = -(2**63), 2**63 - 1
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
#: First and last timestamp in a range: two index probes.
_BOUNDS_SQL = (
    f"SELECT (SELECT timestamp{_RANGE_SQL} ORDER BY symbol, timestamp LIMIT 1) AS first,"
    f" (SELECT timestamp{_RANGE_SQL} ORDER BY symbol DESC, timestamp DESC LIMIT 1) AS last"
)
#: The timestamp of the quote in force at a time: one backward index probe.
_IN_FORCE_SQL = (
    "SELECT timestamp FROM orderbook_data WHERE symbol = $1 AND timestamp <= $2::bigint"
    " AND ($3::text IS NULL OR exchange = $3::text) ORDER BY symbol DESC, timestamp DESC LIMIT 1"
)
_SNAPSHOT_RE = re.compile(r"^[0-9A-Fa-f]+(-[0-9A-Fa-f]+)+$")


def to_epoch_us(value: object, name: str = "time") -> int:
    """Microseconds since the Unix epoch (UTC) for any accepted time form; ``ValueError`` else.

    Naive ``datetime``/ISO strings/``numpy.datetime64`` are UTC. Sub-microsecond parts round up.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a time")
    if isinstance(value, int | np.integer):
        micros = int(value)
    elif isinstance(value, np.datetime64):
        micros = _datetime64_us(value, name)
    elif isinstance(value, dt.datetime):
        micros = _datetime_us(value)
    elif isinstance(value, dt.date):
        micros = _datetime_us(dt.datetime(value.year, value.month, value.day))
    elif isinstance(value, str):
        micros = _parse_time_text(value, name)
    else:
        raise ValueError(f"{name}={value!r} is not a time (datetime, ISO string, int µs, ...)")
    if not _INT8_MIN <= micros <= _INT8_MAX:
        raise ValueError(f"{name}={value!r} is out of range")
    return micros


def _datetime_us(value: dt.datetime) -> int:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)
    micros = (aware - _EPOCH) // _US
    nanos = getattr(value, "nanosecond", 0)  # pandas.Timestamp carries nanoseconds
    return micros + 1 if nanos else micros


def _datetime64_us(value: np.datetime64, name: str) -> int:
    if np.isnat(value):
        raise ValueError(f"{name}={value!r} is not a time (NaT)")
    floor = value.astype("datetime64[us]")
    micros = int(floor.astype(np.int64))
    return micros + 1 if floor < value else micros


def _parse_time_text(text: str, name: str) -> int:
    stripped = text.strip()
    try:
        parsed = dt.datetime.fromisoformat(stripped.replace("Z", "+00:00"))
    except ValueError:
        parsed = None
    if parsed is not None:
        return _datetime_us(parsed)
    try:
        import pandas as pd

        stamp: dt.datetime | None = pd.Timestamp(stripped)
    except (ImportError, ValueError, TypeError, OverflowError):
        stamp = None
    if not isinstance(stamp, dt.datetime) or str(stamp) == "NaT":
        raise ValueError(f"{name}={text!r} is not a time (expected ISO 8601)") from None
    return _datetime_us(stamp)


_FREQ_UNITS_US = {
    "us": 1,
    "ms": 1_000,
    "s": 1_000_000,
    "sec": 1_000_000,
    "m": 60_000_000,
    "min": 60_000_000,
    "t": 60_000_000,
    "h": 3_600_000_000,
    "d": 86_400_000_000,
}
_FREQ_RE = re.compile(r"^\s*(\d+)?\s*([a-zA-Z]+)\s*$")


def parse_freq_us(freq: object) -> int:
    """A bucket width in microseconds from ``"1s"``, ``"5min"``, ``"1h"``, a timedelta or int µs."""
    if isinstance(freq, bool):
        raise ValueError(f"freq={freq!r} is not a duration")
    if isinstance(freq, int | np.integer):
        width = int(freq)
    elif isinstance(freq, dt.timedelta):
        width = freq // _US
    elif isinstance(freq, np.timedelta64):
        width = int(freq.astype("timedelta64[us]").astype(np.int64))
    elif isinstance(freq, str):
        match = _FREQ_RE.match(freq)
        unit = _FREQ_UNITS_US.get(match.group(2).lower()) if match else None
        if match is None or unit is None:
            raise ValueError(f"freq={freq!r} is not a duration like '1s', '5min', '1h'")
        width = int(match.group(1) or 1) * unit
    else:
        raise ValueError(f"freq={freq!r} is not a duration")
    if width <= 0:
        raise ValueError(f"freq={freq!r} must be positive")
    return width


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
        raise ValueError(f"symbol={symbol!r} must be a non-empty string")
    if "\x00" in symbol:
        raise ValueError(f"symbol={symbol!r} contains NUL, which PostgreSQL text cannot hold")
    try:
        symbol.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"symbol={symbol!r} is not valid Unicode text") from None
    return symbol


def _symbol_list(symbols: str | Iterable[str] | None) -> list[str]:
    if symbols is None:
        return []
    if isinstance(symbols, str):
        return [_check_symbol(symbols)]
    if not isinstance(symbols, Iterable):
        raise ValueError(f"symbols={symbols!r} must be a string or a list of strings")
    checked = [_check_symbol(s) for s in symbols]
    if not checked:
        raise ValueError("symbols=[] names no symbol")
    return checked


def _check_output(output: object) -> Output:
    if output not in OUTPUT_FORMATS:
        raise ValueError(f"output={output!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    return output  # type: ignore[return-value]


def _check_exchange(exchange: object) -> str | None:
    if exchange is None:
        return None
    if not isinstance(exchange, str) or not exchange or "\x00" in exchange:
        raise ValueError(f"exchange={exchange!r} must be a non-empty string without NUL")
    return exchange


def _check_columns(columns: Sequence[str] | None) -> tuple[str, ...]:
    if columns is None:
        return QUOTE_COLUMNS
    if isinstance(columns, str):
        columns = [columns]
    chosen = tuple(columns)
    for column in chosen:
        if column not in READ_COLUMNS:
            raise ValueError(f"columns: {column!r} is not one of {', '.join(READ_COLUMNS)}")
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"columns={list(chosen)!r} must name each column once")
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
        raise ValueError("symbol=None: name one symbol or a list of them")
    names = _symbol_list(symbols)
    start_us = to_epoch_us(start, "start")
    end_us = to_epoch_us(end, "end")
    if start_us >= end_us:
        raise ValueError(f"start={start!r} must be before end={end!r}")
    checked_output = _check_output(output)
    checked_exchange = _check_exchange(exchange)
    # Unique, in code-point order (the output order); names too long for VARCHAR(20) match
    # nothing, so they are never sent.
    ordered = tuple(s for s in sorted(set(names)) if len(s) <= _SYMBOL_MAX_CHARS)
    if checked_exchange is not None and len(checked_exchange) > _EXCHANGE_MAX_CHARS:
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


# -- assembling decoded columns ------------------------------------------------------------


@dataclass
class _Block:
    """Decoded rows of one symbol (or one chunk of them), columns by name."""

    symbol: str
    nrows: int
    columns: dict[str, DecodedColumn]


def _concat(parts: list[DecodedColumn], kind: ColumnKind, exact: bool) -> DecodedColumn:
    if kind is ColumnKind.TEXT:
        texts = [p for p in parts if isinstance(p, TextColumn)]
        return _concat_text(texts)
    arrays = [p for p in parts if isinstance(p, np.ndarray)]
    if not arrays:
        dtype = np.int64 if kind is ColumnKind.INT8 else (object if exact else np.float64)
        return np.zeros(0, dtype=dtype)
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays)  # type: ignore[return-value]


def _concat_text(parts: list[TextColumn]) -> TextColumn:
    if not parts:
        return TextColumn(np.zeros(0, dtype=np.int32), ())
    if len(parts) == 1:
        return parts[0]
    categories: dict[str, int] = {}
    recoded: list[npt.NDArray[np.int32]] = []
    for part in parts:
        remap = np.empty(len(part.categories) + 1, dtype=np.int32)
        for i, value in enumerate(part.categories):
            remap[i] = categories.setdefault(value, len(categories))
        remap[-1] = -1
        recoded.append(remap[part.codes])
    return TextColumn(np.concatenate(recoded), tuple(categories))


def _block_from_batches(
    plan: _Plan, symbol: str, batches: list[list[DecodedColumn]], *, check_order: bool
) -> _Block:
    names = plan.copy_columns
    kinds = plan.kinds
    columns = {
        name: _concat([batch[i] for batch in batches], kinds[i], plan.exact)
        for i, name in enumerate(names)
    }
    timestamps = columns["timestamp"]
    nrows = len(timestamps)
    if check_order and nrows > 1:
        ids = columns["id"]
        assert isinstance(timestamps, np.ndarray) and isinstance(ids, np.ndarray)
        same_time = timestamps[1:] == timestamps[:-1]
        if (same_time & (ids[1:] < ids[:-1])).any():
            order = np.lexsort((ids, timestamps))
            columns = {name: _take(col, order) for name, col in columns.items()}
    return _Block(symbol, nrows, columns)


def _take(column: DecodedColumn, order: npt.NDArray[np.intp]) -> DecodedColumn:
    if isinstance(column, TextColumn):
        return TextColumn(column.codes[order], column.categories)
    return column[order]


def _constant_text(value: str, nrows: int) -> TextColumn:
    return TextColumn(np.zeros(nrows, dtype=np.int32), (value,) if nrows else ())


def _merge_blocks(plan: _Plan, blocks: list[_Block]) -> dict[str, DecodedColumn]:
    """The requested columns over all blocks, in block order."""
    out: dict[str, DecodedColumn] = {}
    for name in plan.columns:
        parts: list[DecodedColumn] = []
        for block in blocks:
            if name == "symbol":
                parts.append(_constant_text(block.symbol, block.nrows))
            elif name == "exchange" and plan.exchange is not None:
                parts.append(_constant_text(plan.exchange, block.nrows))
            else:
                parts.append(block.columns[name])
        out[name] = _concat(parts, _kind(name), plan.exact)
    return out


# -- output formats ------------------------------------------------------------------------


def build_frame(columns: Mapping[str, DecodedColumn], output: Output, *, exact: bool) -> Frame:
    """Decoded columns -> the requested output type.

    Times (``timestamp``, ``local_timestamp``, ``time``, ``bucket``) become UTC microsecond
    timestamps; text columns become categoricals (pandas), strings (polars), dictionary arrays
    (Arrow) or object arrays (numpy). NULL prices are NaN (``None`` when exact).
    """
    if output == "numpy":
        return {name: _numpy_column(name, col) for name, col in columns.items()}
    if output == "pandas":
        return _pandas_frame(columns, exact)
    if output == "polars":
        return _polars_frame(columns, exact)
    return _arrow_table(columns, exact)


def _numpy_column(name: str, column: DecodedColumn) -> npt.NDArray[np.generic]:
    if isinstance(column, TextColumn):
        return column.to_objects()
    if name in _TIME_COLUMNS:
        return column.view("datetime64[us]")
    return column


def _pandas_frame(columns: Mapping[str, DecodedColumn], exact: bool) -> Frame:
    import pandas as pd

    data: dict[str, object] = {}
    for name, column in columns.items():
        if isinstance(column, TextColumn):
            data[name] = pd.Categorical.from_codes(
                column.codes, categories=pd.Index(list(column.categories), dtype=object)
            )
        elif name in _TIME_COLUMNS:
            times = pd.Series(column.view("datetime64[us]"), copy=False)
            data[name] = times.dt.tz_localize("UTC")
        else:
            data[name] = column
    return pd.DataFrame(data, copy=False)


def _polars_frame(columns: Mapping[str, DecodedColumn], exact: bool) -> Frame:
    import polars as pl

    series = []
    for name, column in columns.items():
        if isinstance(column, TextColumn):
            values = pl.Series(name, list(column.categories), dtype=pl.String)
            if (column.codes < 0).any():
                series.append(pl.Series(name, column.to_objects().tolist(), dtype=pl.String))
            else:
                series.append(values.gather(column.codes))
        elif name in _TIME_COLUMNS:
            stamps = pl.Series(name, column).cast(pl.Datetime("us", "UTC"))
            missing = column == _NAT
            if missing.any():  # as-of rows before the first quote
                stamps = stamps.scatter(np.flatnonzero(missing), None)
            series.append(stamps)
        elif column.dtype == object:
            series.append(pl.Series(name, column.tolist(), dtype=pl.Decimal(20, 8)))
        else:
            series.append(pl.Series(name, column))
    return pl.DataFrame(series)


def _arrow_table(columns: Mapping[str, DecodedColumn], exact: bool) -> Frame:
    import pyarrow as pa

    arrays = []
    for name, column in columns.items():
        if isinstance(column, TextColumn):
            codes = pa.array(column.codes, mask=column.codes < 0, type=pa.int32())
            dictionary = pa.array(list(column.categories), type=pa.string())
            arrays.append(pa.DictionaryArray.from_arrays(codes, dictionary))
        elif name in _TIME_COLUMNS:
            stamps = pa.array(column, type=pa.int64(), mask=column == _NAT)
            arrays.append(stamps.cast(pa.timestamp("us", tz="UTC")))
        elif column.dtype == object:
            arrays.append(pa.array(column.tolist(), type=pa.decimal128(20, 8)))
        else:
            arrays.append(pa.array(column))
    return pa.table(arrays, names=list(columns))


def _rows_to_columns(
    rows: Sequence[Mapping[str, object]], names: Sequence[str], exact: bool
) -> dict[str, DecodedColumn]:
    """Plain query rows (few of them: latest, asof, resample) -> decoded-column form."""
    out: dict[str, DecodedColumn] = {}
    for name in names:
        values = [row[name] for row in rows]
        if name in _TEXT_COLUMNS:
            index: dict[str, int] = {}
            codes = np.array(
                [-1 if v is None else index.setdefault(str(v), len(index)) for v in values],
                dtype=np.int32,
            )
            out[name] = TextColumn(codes, tuple(index))
        elif name in DECIMAL_COLUMNS or isinstance(next(iter(values), None), Decimal | float):
            if exact and name in DECIMAL_COLUMNS:
                out[name] = np.array(values, dtype=object)
            else:
                out[name] = np.array(
                    [np.nan if v is None else float(v) for v in values],  # type: ignore[arg-type]
                    dtype=np.float64,
                )
        else:
            if any(v is None for v in values):
                if name in _TIME_COLUMNS:
                    out[name] = np.array([_NAT if v is None else v for v in values], dtype=np.int64)
                else:
                    out[name] = np.array(
                        [np.nan if v is None else v for v in values], dtype=np.float64
                    )
            else:
                out[name] = np.array(values, dtype=np.int64)
    return out


# -- the reader ----------------------------------------------------------------------------


class Reader:
    """Range, stream, latest, as-of and resample queries on one engine.

    Every method opens one pooled connection and one read-only transaction; nothing is cached
    between calls. ``OrderbookRepository`` delegates its read methods here.
    """

    #: Bytes of COPY text decoded at a time: small enough to stay in cache and overlap with
    #: the server; large enough that numpy's per-call overhead is noise.
    batch_bytes = 2 << 20
    #: Reads the planner expects to be at least this large use two connections at once.
    parallel_min_rows = 200_000
    parallel = True
    #: How many connections the last ``quotes()`` read on (1 or 2), for diagnostics.
    last_read_connections = 0
    #: ``asof`` with at least this many times considers one range read instead of probes ...
    asof_range_min_times = 1_000
    #: ... when that range holds at most this many quotes per requested time.
    asof_range_rows_per_time = 50

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

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
        """Quotes of ``symbols`` with ``start <= timestamp < end``, ordered by symbol, time, id.

        See the module docstring for accepted times and the output types. An unknown symbol
        gives no rows; an empty result has the same columns and dtypes. Costs one COPY per
        symbol in one read-only transaction; memory is the result plus one 2 MB batch.
        """
        plan = plan_quotes(
            symbols,
            start,
            end,
            exchange=exchange,
            columns=columns,
            output=output,
            exact=exact,
        )
        return build_frame(await self._read_columns(plan), plan.output, exact=plan.exact)

    async def _read_columns(self, plan: _Plan) -> dict[str, DecodedColumn]:
        """The decoded columns of a validated range read (see ``quotes``)."""
        blocks: list[_Block] = []
        if plan.symbols:
            async with self.engine.connect() as conn:
                raw = await _raw(conn)
                async with raw.transaction(isolation="repeatable_read", readonly=True):
                    parts, rows = await self._parts(raw, plan)
                    snapshot = None
                    self.last_read_connections = 1
                    if self.parallel and len(parts) > 1 and rows >= self.parallel_min_rows:
                        snapshot = await _export_snapshot(raw)
                    if snapshot is not None:
                        results = await self._copy_parallel(raw, plan, parts, snapshot)
                    else:
                        results = [await self._copy_batches(raw, plan, part) for part in parts]
            blocks = [
                _block_from_batches(plan, part.symbol, batches, check_order=True)
                for part, batches in zip(parts, results, strict=True)
            ]
        return _merge_blocks(plan, blocks)

    async def _parts(self, raw: asyncpg.Connection, plan: _Plan) -> tuple[list[_Part], int]:
        """The COPYs to run, in output order, and the planner's estimate of all rows.

        A symbol whose range the planner expects to hold ``parallel_min_rows`` or more is cut
        in two at the middle of its first and last timestamps (a timestamp boundary, so equal
        timestamps never straddle two parts).
        """
        parts: list[_Part] = []
        total = 0
        for symbol in plan.symbols:
            args = (symbol, plan.start_us, plan.end_us, plan.exchange)
            explained = await raw.fetchval(_ESTIMATE_SQL, *args)
            # SQLAlchemy registers a json codec on its connections; plain asyncpg gives text.
            if isinstance(explained, str | bytes):
                explained = json.loads(explained)
            estimate = int(explained[0]["Plan"]["Plan Rows"])
            total += estimate
            if self.parallel and estimate >= self.parallel_min_rows:
                bounds = await raw.fetchrow(_BOUNDS_SQL, *args)
                first, last = bounds["first"], bounds["last"]
                if first is not None and last is not None and last > first:
                    middle = first + (last - first + 1) // 2
                    parts.append(_Part(symbol, plan.start_us, middle))
                    parts.append(_Part(symbol, middle, plan.end_us))
                    continue
            parts.append(_Part(symbol, plan.start_us, plan.end_us))
        return parts, total

    async def _copy_parallel(
        self, raw: asyncpg.Connection, plan: _Plan, parts: list[_Part], snapshot: str
    ) -> list[list[list[DecodedColumn]]]:
        """Run ``parts`` over this connection and a second one sharing its snapshot.

        Two server processes produce rows at once (the server's per-row work is the limit on a
        single connection); ``SET TRANSACTION SNAPSHOT`` makes the second read exactly what the
        first sees, so the result is one consistent picture of the table.
        """
        if not _SNAPSHOT_RE.match(snapshot):
            raise RuntimeError(f"unexpected snapshot id {snapshot!r}")
        results: list[list[list[DecodedColumn]] | None] = [None] * len(parts)
        order = iter(range(len(parts)))
        state = {"finished": False}  # the first connection is done (or failed)

        async def work(connection: asyncpg.Connection) -> None:
            for index in order:
                if state["finished"] and connection is not raw:
                    return  # the first connection failed: stop after the current part
                results[index] = await self._copy_batches(connection, plan, parts[index])

        joined = asyncio.Event()

        async def helper() -> None:
            # Never cancelled while a statement is in flight (a late cancel request could hit
            # the pooled connection's next user): once the first connection is done, it just
            # gives its connection back unused.
            async with contextlib.AsyncExitStack() as stack:
                try:
                    conn = await stack.enter_async_context(self.engine.connect())
                    if state["finished"]:
                        return
                    second = await _raw(conn)
                    await stack.enter_async_context(
                        second.transaction(isolation="repeatable_read", readonly=True)
                    )
                    # The id comes from the server and is checked above; SET takes no
                    # parameter.
                    await second.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
                except Exception:
                    return  # no second connection after all: the first one reads every part
                joined.set()
                self.last_read_connections = 2
                await work(second)

        first = asyncio.ensure_future(work(raw))
        second_task = asyncio.ensure_future(helper())
        try:
            await first
        except BaseException:
            state["finished"] = True
            if joined.is_set():
                await asyncio.gather(second_task, return_exceptions=True)
            else:
                _detach(second_task)
            raise
        state["finished"] = True
        if joined.is_set():
            await second_task  # it is reading parts: wait for them
        else:
            # Still waiting for a pooled connection (a busy pool): not needed any more. It
            # gives the connection back as soon as it gets one; the read does not wait.
            _detach(second_task)
        return [r if r is not None else [] for r in results]

    async def _copy_batches(
        self, raw: asyncpg.Connection, plan: _Plan, part: _Part
    ) -> list[list[DecodedColumn]]:
        decoder = TextCopyDecoder(plan.kinds, exact=plan.exact, batch_bytes=self.batch_bytes)
        batches: list[list[DecodedColumn]] = []

        async def sink(chunk: bytes) -> None:
            batches.extend(decoder.feed(chunk))

        await raw.fetchval(_BIND_SQL, *plan.bind_args(part.symbol))
        await raw.copy_from_query(
            plan.copy_sql(order_by_id=False, start_us=part.start_us, end_us=part.end_us),
            output=sink,
        )
        batches.extend(decoder.finish())
        return batches

    async def iter_quotes(
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
        """The same rows as ``quotes()`` as frames of at most ``chunk_rows`` rows each.

        Memory stays flat however long the range: the COPY is paused (TCP back-pressure) while
        a chunk waits to be consumed, so at most one chunk, one 2 MB batch and the socket
        buffers are held. The server sorts equal timestamps by id here (a chunk cannot be
        re-sorted after it was handed out). Nothing is yielded for an unknown symbol.
        """
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows!r} must be a positive integer")
        plan = plan_quotes(
            symbols,
            start,
            end,
            exchange=exchange,
            columns=columns,
            output=output,
            exact=exact,
        )
        if not plan.symbols:
            return
        async with self.engine.connect() as conn:
            raw = await _raw(conn)
            async with raw.transaction(isolation="repeatable_read", readonly=True):
                for symbol in plan.symbols:
                    async for block in self._stream_symbol(raw, plan, symbol, chunk_rows):
                        yield build_frame(
                            _merge_blocks(plan, [block]), plan.output, exact=plan.exact
                        )

    async def _stream_symbol(
        self, raw: asyncpg.Connection, plan: _Plan, symbol: str, chunk_rows: int
    ) -> AsyncIterator[_Block]:
        queue: asyncio.Queue[list[DecodedColumn] | None] = asyncio.Queue(maxsize=1)
        decoder = TextCopyDecoder(plan.kinds, exact=plan.exact, batch_bytes=self.batch_bytes)

        async def sink(chunk: bytes) -> None:
            for batch in decoder.feed(chunk):
                await queue.put(batch)  # waits while the consumer is behind

        async def produce() -> None:
            await raw.copy_from_query(plan.copy_sql(order_by_id=True), output=sink)
            for batch in decoder.finish():
                await queue.put(batch)
            await queue.put(None)

        await raw.fetchval(_BIND_SQL, *plan.bind_args(symbol))
        producer = asyncio.ensure_future(produce())
        pending: list[list[DecodedColumn]] = []
        pending_rows = 0
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    {getter, producer}, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                    producer.result()  # raises the COPY's error
                    continue
                batch = getter.result()
                if batch is None:
                    break
                pending.append(batch)
                pending_rows += len(batch[0])
                while pending_rows >= chunk_rows:
                    block = _block_from_batches(plan, symbol, pending, check_order=False)
                    head, tail = _split_block(plan, block, chunk_rows)
                    yield head
                    pending = [[tail.columns[name] for name in plan.copy_columns]]
                    pending_rows = tail.nrows
            if pending_rows:
                yield _block_from_batches(plan, symbol, pending, check_order=False)
            await producer
        finally:
            if not producer.done():
                producer.cancel()
                with _suppress_cancel():
                    await producer

    async def latest(
        self,
        symbols: str | Iterable[str] | None = None,
        *,
        output: Output = "pandas",
        exact: bool = False,
    ) -> Frame:
        """The last quote (greatest timestamp, then id) of each symbol, ordered by symbol.

        ``symbols=None`` means every stored symbol, found by a recursive skip scan of
        ``idx_orderbook_symbol_timestamp`` (one index probe per distinct symbol, never a table
        scan); each symbol's last row is one backward index probe.
        """
        checked_output = _check_output(output)
        names = None if symbols is None else sorted(set(_symbol_list(symbols)))
        columns = ("id", *QUOTE_COLUMNS)
        async with self.engine.connect() as conn:
            raw = await _raw(conn)
            async with raw.transaction(isolation="repeatable_read", readonly=True):
                if names is None:
                    rows = await raw.fetch(LATEST_ALL_SQL)
                else:
                    rows = await raw.fetch(LATEST_SOME_SQL, names)
        picked = [dict(r) for r in rows]
        picked.sort(key=lambda r: str(r["symbol"]))
        data = _rows_to_columns(picked, columns, exact)
        return build_frame({c: data[c] for c in QUOTE_COLUMNS}, checked_output, exact=exact)

    async def asof(
        self,
        symbol: str,
        times: Iterable[TimeLike] | TimeLike,
        *,
        exchange: str | None = None,
        output: Output = "pandas",
        exact: bool = False,
    ) -> Frame:
        """For each of ``times``, the quote in force then: the last one at or before it.

        One row per given time, in the given order, with a ``time`` column first; rows with no
        earlier quote hold NaN/NaT. This is ``pandas.merge_asof(times, quotes,
        direction="backward")``. Few times: one backward index probe each, in the database.
        Many times (``asof_range_min_times`` or more) over a range holding not many more quotes
        than times: one range read from the quote in force at the earliest time to the latest
        time, matched on the client with a binary search; never the whole table.
        """
        checked_symbol = _check_symbol(symbol)
        checked_output = _check_output(output)
        checked_exchange = _check_exchange(exchange)
        if isinstance(times, str | dt.date | np.datetime64 | int | np.integer):
            times = [times]
        stamps = [to_epoch_us(t, "times") for t in times]
        if len(stamps) >= self.asof_range_min_times:
            ranged = await self._asof_by_range(
                checked_symbol, stamps, checked_exchange, checked_output, exact
            )
            if ranged is not None:
                return build_frame(ranged, checked_output, exact=exact)
        columns = ("time", *QUOTE_COLUMNS)
        rows: list[Mapping[str, object]] = []
        if stamps:
            async with self.engine.connect() as conn:
                raw = await _raw(conn)
                async with raw.transaction(isolation="repeatable_read", readonly=True):
                    fetched = await raw.fetch(ASOF_SQL, stamps, checked_symbol, checked_exchange)
            rows = [dict(r) for r in fetched]
        data = _rows_to_columns(rows, columns, exact)
        if "time" in data and not rows:
            data["time"] = np.zeros(0, dtype=np.int64)
        return build_frame(data, checked_output, exact=exact)

    async def _asof_by_range(
        self,
        symbol: str,
        stamps: list[int],
        exchange: str | None,
        output: Output,
        exact: bool,
    ) -> dict[str, DecodedColumn] | None:
        """As-of by one bounded range read, or None when that range holds too many rows."""
        earliest, latest = min(stamps), max(stamps)
        async with self.engine.connect() as conn:
            raw = await _raw(conn)
            async with raw.transaction(isolation="repeatable_read", readonly=True):
                in_force = await raw.fetchval(_IN_FORCE_SQL, symbol, earliest, exchange)
                start = earliest if in_force is None else int(in_force)
                explained = await raw.fetchval(_ESTIMATE_SQL, symbol, start, latest + 1, exchange)
        if isinstance(explained, str | bytes):
            explained = json.loads(explained)
        if int(explained[0]["Plan"]["Plan Rows"]) > self.asof_range_rows_per_time * len(stamps):
            return None
        plan = plan_quotes(symbol, start, latest + 1, exchange=exchange, output=output, exact=exact)
        columns = await self._read_columns(plan)
        wanted = np.array(stamps, dtype=np.int64)
        stored = columns["timestamp"]
        assert isinstance(stored, np.ndarray)
        # Rows come ordered by (timestamp, id): the last one at or before each time wins.
        index = np.searchsorted(stored, wanted, side="right") - 1
        missing = index < 0
        index[missing] = 0
        out: dict[str, DecodedColumn] = {"time": wanted}
        for name, column in columns.items():
            out[name] = _take_or_missing(column, index, missing, name)
        return out

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
        """Per time bucket of width ``freq``: OHLC of the mid price, last bid and ask, mean
        spread and quote count, computed in PostgreSQL.

        Buckets are aligned to the Unix epoch (for widths that divide a day, the same as
        pandas' default) and labelled by their start. Buckets without quotes are absent, not
        NaN rows. Columns: bucket, open, high, low, close, last_bid, last_ask, mean_spread,
        quotes. Values are the exact decimal results rounded once to float64.
        """
        checked_symbol = _check_symbol(symbol)
        checked_output = _check_output(output)
        checked_exchange = _check_exchange(exchange)
        width = parse_freq_us(freq)
        start_us = to_epoch_us(start, "start")
        end_us = to_epoch_us(end, "end")
        if start_us >= end_us:
            raise ValueError(f"start={start!r} must be before end={end!r}")
        async with self.engine.connect() as conn:
            raw = await _raw(conn)
            async with raw.transaction(isolation="repeatable_read", readonly=True):
                rows = await raw.fetch(
                    RESAMPLE_SQL, checked_symbol, start_us, end_us, width, checked_exchange
                )
        data = _rows_to_columns([dict(r) for r in rows], RESAMPLE_COLUMNS, False)
        for name in RESAMPLE_COLUMNS[1:-1]:
            if len(data[name]) == 0:
                data[name] = np.zeros(0, dtype=np.float64)
        return build_frame(data, checked_output, exact=False)


def _take_or_missing(
    column: DecodedColumn, index: npt.NDArray[np.intp], missing: npt.NDArray[np.bool_], name: str
) -> DecodedColumn:
    """``column[index]``, with rows flagged ``missing`` set to NULL (NaN, NaT, None, code -1)."""
    if isinstance(column, TextColumn):
        codes = column.codes[index] if len(column) else np.zeros(len(index), dtype=np.int32)
        codes[missing] = -1
        return TextColumn(codes, column.categories)
    if len(column) == 0:
        if column.dtype == object:
            return np.full(len(index), None, dtype=object)
        if name in _TIME_COLUMNS:
            return np.full(len(index), _NAT, dtype=np.int64)
        return np.full(len(index), np.nan, dtype=np.float64)
    taken = column[index]
    if missing.any():
        if taken.dtype == object:
            taken = np.where(missing, np.array(None, dtype=object), taken)
        elif name in _TIME_COLUMNS:
            taken[missing] = _NAT
        else:
            taken = taken.astype(np.float64)
            taken[missing] = np.nan
    return taken


def _split_block(plan: _Plan, block: _Block, nrows: int) -> tuple[_Block, _Block]:
    head: dict[str, DecodedColumn] = {}
    tail: dict[str, DecodedColumn] = {}
    for name, column in block.columns.items():
        if isinstance(column, TextColumn):
            head[name] = TextColumn(column.codes[:nrows], column.categories)
            tail[name] = TextColumn(column.codes[nrows:], column.categories)
        else:
            head[name] = column[:nrows]
            tail[name] = column[nrows:]
    return (
        _Block(block.symbol, nrows, head),
        _Block(block.symbol, block.nrows - nrows, tail),
    )


class _suppress_cancel:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return exc_type is asyncio.CancelledError or isinstance(exc, Exception)


_DETACHED: set[asyncio.Future[None]] = set()


def _detach(task: asyncio.Future[None]) -> None:
    """Let ``task`` finish on its own: keep it referenced, and its outcome retrieved."""
    _DETACHED.add(task)

    def done(finished: asyncio.Future[None]) -> None:
        _DETACHED.discard(finished)
        if not finished.cancelled():
            finished.exception()

    task.add_done_callback(done)


async def _export_snapshot(raw: asyncpg.Connection) -> str | None:
    """This transaction's snapshot id for a second connection, or None on a standby (which
    cannot export one): the read then stays on one connection.

    No savepoint around it: PostgreSQL refuses to export from a subtransaction.
    """
    snapshot = await raw.fetchval(
        "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_export_snapshot() END"
    )
    return None if snapshot is None else str(snapshot)


async def _raw(conn: object) -> asyncpg.Connection:
    """The asyncpg connection under a SQLAlchemy ``AsyncConnection``."""
    fairy = await conn.get_raw_connection()  # type: ignore[attr-defined]
    return fairy.driver_connection


_QUOTE_SELECT = (
    "o.id, o.exchange, o.symbol, o.timestamp, o.local_timestamp,"
    " o.ask_amount, o.ask_price, o.bid_price, o.bid_amount"
)

#: Distinct symbols by a recursive skip scan (each step one index probe for the next greater
#: symbol), then each symbol's last quote by a backward probe.
LATEST_ALL_SQL = f"""
WITH RECURSIVE symbols AS (
    (SELECT symbol FROM orderbook_data ORDER BY symbol, timestamp LIMIT 1)
    UNION ALL
    SELECT (SELECT o.symbol FROM orderbook_data o
            WHERE o.symbol > s.symbol ORDER BY o.symbol, o.timestamp LIMIT 1)
    FROM symbols s WHERE s.symbol IS NOT NULL
)
SELECT q.* FROM symbols s CROSS JOIN LATERAL (
    SELECT {_QUOTE_SELECT} FROM orderbook_data o
    WHERE o.symbol = s.symbol
    ORDER BY o.timestamp DESC, o.id DESC LIMIT 1
) q
WHERE s.symbol IS NOT NULL
"""

LATEST_SOME_SQL = f"""
SELECT q.* FROM unnest($1::text[]) AS s(symbol) CROSS JOIN LATERAL (
    SELECT {_QUOTE_SELECT} FROM orderbook_data o
    WHERE o.symbol = s.symbol
    ORDER BY o.timestamp DESC, o.id DESC LIMIT 1
) q
"""

ASOF_SQL = f"""
SELECT t.time, q.* FROM unnest($1::bigint[]) WITH ORDINALITY AS t(time, n)
LEFT JOIN LATERAL (
    SELECT {_QUOTE_SELECT} FROM orderbook_data o
    WHERE o.symbol = $2 AND o.timestamp <= t.time
      AND ($3::text IS NULL OR o.exchange = $3::text)
    ORDER BY o.timestamp DESC, o.id DESC LIMIT 1
) q ON true
ORDER BY t.n
"""

RESAMPLE_COLUMNS: tuple[str, ...] = (
    "bucket",
    "open",
    "high",
    "low",
    "close",
    "last_bid",
    "last_ask",
    "mean_spread",
    "quotes",
)

RESAMPLE_SQL = """
SELECT bucket,
       ((array_agg(mid ORDER BY timestamp, id))[1])::float8 AS open,
       max(mid)::float8 AS high,
       min(mid)::float8 AS low,
       ((array_agg(mid ORDER BY timestamp DESC, id DESC))[1])::float8 AS close,
       ((array_agg(bid_price ORDER BY timestamp DESC, id DESC))[1])::float8 AS last_bid,
       ((array_agg(ask_price ORDER BY timestamp DESC, id DESC))[1])::float8 AS last_ask,
       avg(ask_price - bid_price)::float8 AS mean_spread,
       count(*) AS quotes
FROM (
    SELECT timestamp - ((timestamp % $4::bigint) + $4::bigint) % $4::bigint AS bucket,
           timestamp, id, bid_price, ask_price, (ask_price + bid_price) / 2 AS mid
    FROM orderbook_data
    WHERE symbol = $1 AND timestamp >= $2::bigint AND timestamp < $3::bigint
      AND ($5::text IS NULL OR exchange = $5::text)
) q
GROUP BY bucket
ORDER BY bucket
"""
