"""Parquet export: one symbol's quotes over a time range, hive-partitioned, exact decimals.

Layout: ``<out>/exchange=<exchange>/symbol=<symbol>/date=<YYYY-MM-DD>/part-0.parquet`` (UTC
date of ``timestamp``; values URI-escaped as hive partitioning does). Each file holds
``timestamp`` and ``local_timestamp`` as ``timestamp[us, tz=UTC]`` and the four decimals as
``decimal128(20, 8)``, the column's own type, so values survive export and import exactly;
``exchange``, ``symbol`` and ``date`` are in the directory names only (pyarrow datasets,
``polars.scan_parquet(..., hive_partitioning=True)`` and DuckDB's ``read_parquet(...,
hive_partitioning = true)`` add them back). Compression zstd. Rows are in ``timestamp`` order
(ties in insertion order).

Exporting a date again replaces that date's file with what the new export covers. The rows
leave the server as ``COPY ... TO STDOUT (FORMAT csv)`` one hour at a time (index range scans
on ``(symbol, timestamp)``), parsed by Arrow's CSV reader straight into decimals, so memory
stays at one hour of one symbol whatever the range.
"""

from __future__ import annotations

import datetime as dt
import io
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

from .models import DECIMAL_COLUMNS, OrderbookData

#: Rows fetched per query: one hour of one symbol.
WINDOW_US: Final = 3_600_000_000
DAY_US: Final = 86_400_000_000
FILE_NAME: Final = "part-0.parquet"

_TIME = pa.timestamp("us", tz="UTC")
_DECIMAL = pa.decimal128(20, 8)

#: The schema of every exported file (partition columns live in the path).
PARQUET_SCHEMA: Final = pa.schema(
    [
        ("timestamp", _TIME),
        ("local_timestamp", _TIME),
        *((name, _DECIMAL) for name in DECIMAL_COLUMNS),
    ]
)

_CSV_NAMES: Final = ["exchange", "timestamp", "local_timestamp", *DECIMAL_COLUMNS]
_CSV_CONVERT: Final = pacsv.ConvertOptions(
    column_types={
        "exchange": pa.string(),
        "timestamp": pa.int64(),
        "local_timestamp": pa.int64(),
        **dict.fromkeys(DECIMAL_COLUMNS, _DECIMAL),
    },
    strings_can_be_null=True,
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


def _parse(data: bytes) -> pa.Table:
    return pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=_CSV_NAMES),
        convert_options=_CSV_CONVERT,
    )


def _to_parquet(rows: pa.Table) -> pa.Table:
    return pa.table(
        [
            rows.column("timestamp").cast(_TIME),
            rows.column("local_timestamp").cast(_TIME),
            *(rows.column(name) for name in DECIMAL_COLUMNS),
        ],
        schema=PARQUET_SCHEMA,
    )


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
    data; empty stretches cost one query each, however long.
    """
    started = time.perf_counter()
    summary = ExportSummary()
    writers: dict[str, pq.ParquetWriter] = {}
    current_day: dt.date | None = None
    low = start_us
    try:
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            while low < end_us:
                # Jump over empty stretches: the next quote decides the next window.
                found = await raw.fetchval(_NEXT, symbol, low, end_us)
                if found is None:
                    break
                window_end = min(end_us, found - found % WINDOW_US + WINDOW_US)
                day = dt.datetime.fromtimestamp(found // 1_000_000, tz=dt.timezone.utc).date()
                if day != current_day:
                    for writer in writers.values():
                        writer.close()
                    writers.clear()
                    current_day = day
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
                    writer = writers.get(exchange)
                    if writer is None:
                        directory = partition_dir(out, exchange, symbol, day)
                        directory.mkdir(parents=True, exist_ok=True)
                        path = directory / FILE_NAME
                        writer = writers[exchange] = pq.ParquetWriter(
                            str(path), PARQUET_SCHEMA, compression="zstd"
                        )
                        summary.files.append(path)
                    writer.write_table(_to_parquet(part))
                summary.rows += rows.num_rows
                if on_rows is not None:
                    on_rows(rows.num_rows)
    finally:
        for writer in writers.values():
            writer.close()
    summary.seconds = time.perf_counter() - started
    return summary
