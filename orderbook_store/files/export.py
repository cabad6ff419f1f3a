"""Parquet export: one symbol's quotes over a time range, hive-partitioned, exact decimals.

Layout: ``<out>/exchange=<exchange>/symbol=<symbol>/date=<YYYY-MM-DD>/part-<from>-<to>.parquet``
(UTC date of ``timestamp``; values URI-escaped as hive partitioning does; ``<from>``/``<to>``
are the microsecond bounds of the part of that date the export covered, so a whole day is
always the same name). Each file holds ``timestamp`` and ``local_timestamp`` as
``timestamp[us, tz=UTC]`` and the four decimals as ``decimal128(20, 8)``, the column's own
type, so values survive export and import exactly; ``exchange``, ``symbol`` and ``date`` are
in the directory names only (pyarrow datasets, ``polars.scan_parquet(...,
hive_partitioning=True)`` and DuckDB's ``read_parquet(..., hive_partitioning = true)`` add
them back). Compression zstd. Rows are in ``timestamp`` order (ties in insertion order).

Exports into one tree never lose or double rows: exporting the same range again replaces its
files; exporting an adjacent range adds files beside them; a range that partly overlaps what
the tree already holds for a date is refused (``ConfigError``) before anything is written.
A file is written under a hidden temporary name and renamed when complete, so an interrupted
export leaves no partial file for ``import`` to find.

The rows leave the server as ``COPY ... TO STDOUT (FORMAT csv)`` one hour at a time (index
range scans on ``(symbol, timestamp)``), parsed by Arrow's CSV reader straight into decimals,
so memory stays at one hour of one symbol whatever the range.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.errors import ConfigError
from orderbook_store.models import DECIMAL_COLUMNS, OrderbookData, arrow_schema
from orderbook_store.pg.connection import raw_connection

#: Rows fetched per query: one hour of one symbol.
WINDOW_US: Final = 3_600_000_000
DAY_US: Final = 86_400_000_000

_PART = re.compile(r"part-([0-9]+)-([0-9]+)\.parquet")

#: The schema of every exported file (partition columns live in the path).
PARQUET_SCHEMA: Final = arrow_schema(
    ("timestamp", "local_timestamp", *DECIMAL_COLUMNS), times_as_timestamps=True
)

_CSV_NAMES: Final = ["exchange", "timestamp", "local_timestamp", *DECIMAL_COLUMNS]
#: COPY's CSV spells NULL as an unquoted empty field and nothing else, so that is the only
#: null: text is never null (an exchange ``NA`` or ``null`` is text, not Arrow's default
#: null spellings), and a decimal is null only where the column holds NULL.
_CSV_CONVERT: Final = pacsv.ConvertOptions(
    column_types=dict(zip(_CSV_NAMES, arrow_schema(_CSV_NAMES).types, strict=True)),
    null_values=[""],
    strings_can_be_null=False,
    quoted_strings_can_be_null=False,
)
_NEXT: Final = (
    f"SELECT min(timestamp) FROM {OrderbookData.__tablename__}"
    " WHERE symbol = $1 AND timestamp >= $2 AND timestamp < $3"
)
_QUERY: Final = (
    "SELECT exchange, timestamp, local_timestamp, "
    + ", ".join(DECIMAL_COLUMNS)
    + f" FROM {OrderbookData.__tablename__}"
    " WHERE symbol = $1 AND timestamp >= $2 AND timestamp < $3 ORDER BY timestamp, id"
)


@dataclass
class ExportSummary:
    """What an export wrote."""

    rows: int = 0
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def partition_dir(out: Path, exchange: str, symbol: str, day: dt.date) -> Path:
    """The directory of one exchange/symbol/date, hive-style."""
    return (
        out
        / f"exchange={quote(exchange, safe='')}"
        / f"symbol={quote(symbol, safe='')}"
        / f"date={day.isoformat()}"
    )


def covered(day: dt.date, start_us: int, end_us: int) -> tuple[int, int]:
    """The part of ``day`` (UTC) that the range ``[start_us, end_us)`` covers, in µs."""
    day_start = (day - dt.date(1970, 1, 1)).days * DAY_US
    return max(start_us, day_start), min(end_us, day_start + DAY_US)


def part_name(low_us: int, high_us: int) -> str:
    """The file name of the part of a date covering ``[low_us, high_us)``."""
    return f"part-{low_us}-{high_us}.parquet"


def check_overlaps(out: Path, symbol: str, start_us: int, end_us: int) -> None:
    """Refuse a range that partly overlaps files already in the tree (see the module doc)."""
    pattern = f"exchange=*/symbol={quote(symbol, safe='')}/date=*/part-*.parquet"
    for existing in sorted(out.glob(pattern)):
        found = _PART.fullmatch(existing.name)
        if found is None:
            continue
        low, high = int(found.group(1)), int(found.group(2))
        day = dt.date.fromisoformat(existing.parent.name.removeprefix("date="))
        mine = covered(day, start_us, end_us)
        if mine[0] < mine[1] and low < mine[1] and mine[0] < high and (low, high) != mine:
            raise ConfigError(
                f"export: {existing} already holds [{low}, {high}) µs, which overlaps this "
                f"export's [{mine[0]}, {mine[1]}) on {day}; export into another directory, "
                "export exactly the ranges already there, or delete those files first"
            )


def _parse(data: bytes) -> pa.Table:
    return pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=_CSV_NAMES),
        convert_options=_CSV_CONVERT,
    )


def _to_parquet(rows: pa.Table) -> pa.Table:
    return pa.table(
        [
            rows.column("timestamp").cast(PARQUET_SCHEMA.field("timestamp").type),
            rows.column("local_timestamp").cast(PARQUET_SCHEMA.field("local_timestamp").type),
            *(rows.column(name) for name in DECIMAL_COLUMNS),
        ],
        schema=PARQUET_SCHEMA,
    )


class _DayFiles:
    """The open files of one date, one per exchange: hidden while written, renamed when done."""

    def __init__(self, out: Path, symbol: str, day: dt.date, bounds: tuple[int, int]) -> None:
        self.out, self.symbol, self.day, self.bounds = out, symbol, day, bounds
        self.writers: dict[str, tuple[pq.ParquetWriter, Path, Path]] = {}

    def write(self, exchange: str, rows: pa.Table, summary: ExportSummary) -> None:
        entry = self.writers.get(exchange)
        if entry is None:
            directory = partition_dir(self.out, exchange, self.symbol, self.day)
            directory.mkdir(parents=True, exist_ok=True)
            final = directory / part_name(*self.bounds)
            temporary = directory / f".{final.name}.tmp"
            writer = pq.ParquetWriter(str(temporary), PARQUET_SCHEMA, compression="zstd")
            entry = self.writers[exchange] = (writer, temporary, final)
            summary.files.append(final)
        entry[0].write_table(_to_parquet(rows))

    def finish(self) -> None:
        for writer, temporary, final in self.writers.values():
            writer.close()
            os.replace(temporary, final)
        self.writers.clear()

    def abandon(self) -> None:
        for writer, temporary, _ in self.writers.values():
            writer.close()
            temporary.unlink(missing_ok=True)
        self.writers.clear()


async def export_parquet(
    engine: AsyncEngine,
    *,
    symbol: str,
    start_us: int,
    end_us: int,
    out: Path,
    on_rows: Callable[[int], None] | None = None,
) -> ExportSummary:
    """Write ``symbol``'s quotes with ``start_us <= timestamp < end_us`` under ``out``.

    Returns the rows and files written. Costs two indexed range queries per hour that has
    data; empty stretches cost one query each, however long. Raises ``ConfigError`` for a
    range that partly overlaps files already in ``out``.
    """
    started = time.perf_counter()
    check_overlaps(out, symbol, start_us, end_us)
    summary = ExportSummary()
    day_files: _DayFiles | None = None
    low = start_us
    try:
        async with engine.connect() as conn:
            raw = await raw_connection(conn)
            while low < end_us:
                # Jump over empty stretches: the next quote decides the next window.
                found = await raw.fetchval(_NEXT, symbol, low, end_us)
                if found is None:
                    break
                window_end = min(end_us, found - found % WINDOW_US + WINDOW_US)
                day = dt.datetime.fromtimestamp(found // 1_000_000, tz=dt.timezone.utc).date()
                if day_files is None or day_files.day != day:
                    if day_files is not None:
                        day_files.finish()
                    day_files = _DayFiles(out, symbol, day, covered(day, start_us, end_us))
                sink = io.BytesIO()
                await raw.copy_from_query(
                    _QUERY, symbol, found, window_end, output=sink, format="csv"
                )
                low = window_end
                if not sink.tell():
                    continue
                rows = _parse(sink.getvalue())
                for exchange in pc.unique(rows.column("exchange")).to_pylist():
                    part = rows.filter(pc.equal(rows.column("exchange"), exchange))
                    day_files.write(exchange, part, summary)
                summary.rows += rows.num_rows
                if on_rows is not None:
                    on_rows(rows.num_rows)
        if day_files is not None:
            day_files.finish()
    except BaseException:
        if day_files is not None:
            day_files.abandon()
        raise
    summary.seconds = time.perf_counter() - started
    return summary
