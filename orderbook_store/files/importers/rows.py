"""Vectorized validation of candidate rows, with :func:`orderbook_store.quote.to_row` as judge.

Every format turns its input into *candidates*: an Arrow table with a ``line`` number, the
table's eight columns (timestamps as digit strings in the format's unit, or int64
microseconds; decimals as strings or null) and an ``error`` set where the format itself could
not read the line. :func:`check` accepts, with a few Arrow kernels per block, every row that
certainly passes :func:`~orderbook_store.quote.to_row` unchanged: plain digit timestamps in
range, plain decimal strings that fit DECIMAL(20,8) (prices not zero), printable exchange and
symbol of the allowed lengths. The rare rest goes through ``to_row`` one by one, which either
accepts it (``"1e-3"`` and friends, written exactly as ``to_row`` rewrites them) or says why
not; that reason is what the quarantine file records. So the importers accept and reject
exactly what the write path does, at Arrow speed for ordinary files.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from orderbook_store.errors import InvalidQuote
from orderbook_store.models import (
    DECIMAL_COLUMNS,
    EXCHANGE_MAX_CHARS,
    QUOTE_COLUMNS,
    SYMBOL_MAX_CHARS,
    arrow_schema,
)
from orderbook_store.quote import (
    DEFAULT_EXCHANGE,
    MAX_TIMESTAMP_US,
    MIN_TIMESTAMP_US,
    QuoteRow,
    to_row,
)

#: The Arrow schema of validated rows: the table's columns, timestamps in microseconds.
ROW_SCHEMA: Final = arrow_schema(QUOTE_COLUMNS, decimals_as_text=True)
assert tuple(ROW_SCHEMA.names) == QUOTE_COLUMNS

_PLAIN_DECIMAL: Final = r"^[0-9]{1,12}(\.[0-9]{1,8})?$"
_DIGITS: Final = r"^[0-9]{1,18}$"
_PRICES: Final = frozenset({"ask_price", "bid_price"})
_LIMITS: Final = {"exchange": EXCHANGE_MAX_CHARS, "symbol": SYMBOL_MAX_CHARS}


@dataclass(frozen=True)
class Rejected:
    """A line that did not become a row: where it is, why, and what it said."""

    line: int
    reason: str
    text: str


@dataclass
class Checked:
    """One block after validation: rows to store, and lines for the quarantine."""

    rows: pa.Table
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def count(self) -> int:
        return int(self.rows.num_rows)


def empty_rows() -> pa.Table:
    return ROW_SCHEMA.empty_table()


def _timestamp_ok(column: pa.Array, scale: int) -> tuple[pa.Array, pa.Array]:
    """(values in µs with zeros where not ok, ok mask) for a digit-string or int64 column."""
    if pa.types.is_integer(column.type):
        values = column.cast(pa.int64())
        ok = pc.fill_null(pc.is_valid(values), False)
    else:
        ok = pc.fill_null(pc.match_substring_regex(column, _DIGITS), False)
        values = pc.if_else(ok, column, "0").cast(pa.int64())
    low, high = -(-MIN_TIMESTAMP_US // scale), -(-MAX_TIMESTAMP_US // scale)
    ok = pc.and_(ok, pc.and_(pc.greater_equal(values, low), pc.less(values, high)))
    ok = pc.fill_null(ok, False)
    if scale != 1:
        values = pc.multiply(pc.if_else(ok, values, 0), scale)
    return values, ok


def _text_ok(column: pa.Array, limit: int) -> pa.Array:
    if not pa.types.is_dictionary(column.type):
        # A file has a handful of exchanges and symbols: check each distinct one once.
        encoded = pc.dictionary_encode(column)
        if len(encoded.dictionary) * 4 < len(column):
            verdict = _text_ok(encoded.dictionary, limit)
            return pc.fill_null(pc.take(verdict, encoded.indices), False)
    length = pc.utf8_length(column)
    ok = pc.and_(pc.greater(length, 0), pc.less_equal(length, limit))
    ok = pc.and_(ok, pc.utf8_is_printable(column))
    # The COPY stream is unquoted CSV: names with a comma or quote take the exact path.
    ok = pc.and_(ok, pc.invert(pc.match_substring_regex(column, r'[,"]')))
    return pc.fill_null(ok, False)


def _decimal_ok(column: pa.Array, price: bool) -> pa.Array:
    ok = pc.match_substring_regex(column, _PLAIN_DECIMAL)
    if price:
        ok = pc.and_(ok, pc.match_substring_regex(column, "[1-9]"))
    return pc.fill_null(pc.or_(pc.is_null(column), ok), False)


def check(candidates: pa.Table, *, timestamp_scale: int = 1, local_scale: int = 1) -> Checked:
    """Validate a block of candidates (see the module docstring).

    ``timestamp_scale``/``local_scale`` turn the timestamp columns' unit into microseconds
    (1000 for milliseconds). Returns the accepted rows as :data:`ROW_SCHEMA` and the
    rejected lines with ``to_row``'s reason.
    """
    size = candidates.num_rows
    if size == 0:
        return Checked(empty_rows())
    columns = {name: candidates.column(name).combine_chunks() for name in candidates.column_names}
    exchange = columns.get("exchange")
    exchange = (
        pa.array([DEFAULT_EXCHANGE] * size, pa.string())
        if exchange is None
        else pc.fill_null(exchange, DEFAULT_EXCHANGE)
    )
    columns["exchange"] = exchange
    ok = _text_ok(exchange, _LIMITS["exchange"])
    ok = pc.and_(ok, _text_ok(columns["symbol"], _LIMITS["symbol"]))
    timestamp, ts_ok = _timestamp_ok(columns["timestamp"], timestamp_scale)
    local, local_ok = _timestamp_ok(columns["local_timestamp"], local_scale)
    ok = pc.and_(ok, pc.and_(ts_ok, local_ok))
    for name in DECIMAL_COLUMNS:
        ok = pc.and_(ok, _decimal_ok(columns[name], name in _PRICES))
    error = columns.get("error")
    if error is not None:
        ok = pc.and_(ok, pc.is_null(error))
    ok = pc.fill_null(ok, False)
    good = pa.table(
        [
            exchange,
            columns["symbol"],
            timestamp,
            local,
            *(columns[name] for name in DECIMAL_COLUMNS),
        ],
        schema=ROW_SCHEMA,
    )
    if pc.all(ok).as_py():
        return Checked(good)
    result = Checked(good.filter(ok))
    suspects = pa.table(columns).filter(pc.invert(ok)).to_pylist()
    exact: list[QuoteRow] = []
    exact_lines: list[int] = []
    for suspect in suspects:
        line = int(suspect["line"])
        text = str(suspect.get("text") or "")
        if suspect.get("error") is not None:
            result.rejected.append(Rejected(line, str(suspect["error"]), text))
            continue
        record = dict(suspect)
        record["timestamp"] = _scaled(record["timestamp"], timestamp_scale)
        record["local_timestamp"] = _scaled(record["local_timestamp"], local_scale)
        try:
            exact.append(to_row(record))
            exact_lines.append(line)
        except InvalidQuote as exc:
            result.rejected.append(Rejected(line, str(exc), text))
    result.rejected.sort(key=lambda entry: entry.line)
    if exact:
        # Keep file order: the rows the exact path accepted go back where they were.
        lines = columns["line"].filter(ok)
        merged = pa.concat_tables(
            [
                result.rows.append_column("line", lines.cast(pa.int64())),
                rows_table(exact).append_column("line", pa.array(exact_lines, pa.int64())),
            ]
        )
        result.rows = merged.sort_by("line").drop_columns(["line"])
    return result


def _scaled(value: object, scale: int) -> object:
    """A digit string in the format's unit as integer microseconds; anything else as is."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value) * scale
    if isinstance(value, int) and scale != 1:
        return value * scale
    return value


def rows_table(rows: Sequence[QuoteRow]) -> pa.Table:
    """Validated rows (``to_row`` output) as a :data:`ROW_SCHEMA` table."""
    return pa.Table.from_pylist(
        [dict(zip(QUOTE_COLUMNS, row, strict=True)) for row in rows], schema=ROW_SCHEMA
    )


_WRITE_OPTIONS: Final = pacsv.WriteOptions(include_header=False, quoting_style="none")


def copy_csv(rows: pa.Table) -> bytes:
    """Rows as ``COPY ... (FORMAT csv)`` input: unquoted, empty cell for NULL.

    Unquoted is safe for ordinary names; a block with any exchange or symbol holding a comma
    or a quote is written whole by :func:`copy_csv_exact` instead.
    """
    plain = pc.invert(
        pc.or_(
            pc.fill_null(pc.match_substring_regex(rows.column("exchange"), r'[,"]'), False),
            pc.fill_null(pc.match_substring_regex(rows.column("symbol"), r'[,"]'), False),
        )
    )
    if not pc.all(plain).as_py():
        return copy_csv_exact(rows)  # rare; keeps the rows in file order
    return _write(rows)


def _write(rows: pa.Table) -> bytes:
    if rows.num_rows == 0:
        return b""
    sink = io.BytesIO()
    pacsv.write_csv(rows, sink, _WRITE_OPTIONS)
    return sink.getvalue()


def copy_csv_exact(rows: pa.Table) -> bytes:
    """Rows as quoted CSV (Python's csv module): for the few names that need quoting."""
    sink = io.StringIO()
    writer = csv.writer(sink, lineterminator="\n")
    for record in rows.to_pylist():
        writer.writerow(["" if record[name] is None else record[name] for name in QUOTE_COLUMNS])
    return sink.getvalue().encode()
