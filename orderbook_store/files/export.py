"""Export: one symbol's quotes over a time range, written in the lake format.

The files are exactly what archiving writes (``files.lake_format``, described in
``docs/lake-format.md``): ``exchange=<e>/symbol=<s>/date=<YYYY-MM-DD>/part-<from>-<to>.parquet``
(``<from>``/``<to>`` the microsecond bounds of the part of that UTC date the export covered, so
a whole day is always the same name), holding ``timestamp``/``local_timestamp`` as
``timestamp[us, UTC]``, the four values as ``decimal128(20, 8)`` (exact), ``id`` and
``created_at``, in (``timestamp``, ``id``) order, zstd, with the format version in the file
metadata. ``import`` reads such a tree back (assigning new ids); DuckDB, polars, pyarrow and
Spark read it as a hive-partitioned dataset.

The target is a directory (``--out``) or the configured lake (``LAKE_URL``: a directory or
``s3://bucket/prefix``), both through the lake's pyarrow filesystem. Exports into one tree
never lose or double rows: exporting the same range again replaces its files; exporting an
adjacent range adds files beside them; a range that partly overlaps what the tree already
holds for a date is refused (``ConfigError``) before anything is written. Only the symbol's
own directories are listed for that check, never the whole bucket. Into the lake, a file
that the lake's catalog (``orderbook_lake_ranges``) records is never replaced: once its
partition is pruned it is the only copy of its rows. A file is complete or
absent (``LakeFile``), so an interrupted export leaves no partial file for a reader to find.

The rows leave the server as ``COPY ... TO STDOUT (FORMAT csv)`` one hour at a time (index
range scans on ``(symbol, timestamp)``), parsed by Arrow's CSV reader straight into decimals,
so memory stays at about one row group per exchange whatever the range.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from pyarrow import fs
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.errors import ConfigError, LakeUnavailable
from orderbook_store.files.lake_format import (
    LakeFile,
    LakeFileRef,
    day_bounds,
    day_dir,
    day_of_us,
    file_name,
)
from orderbook_store.files.lake_store import Lake, directory_lake
from orderbook_store.models import DECIMAL_COLUMNS, LakeRange, OrderbookData, arrow_schema
from orderbook_store.pg.connection import raw_connection

__all__ = [
    "ExportSummary",
    "check_archived",
    "check_overlaps",
    "directory_lake",
    "export_parquet",
    "lake_errors",
    "location",
]

#: Rows fetched per query: one hour of one symbol.
WINDOW_US: Final = 3_600_000_000


_CSV_NAMES: Final = [
    "exchange",
    "timestamp",
    "local_timestamp",
    *DECIMAL_COLUMNS,
    "id",
    "created_at",
]
#: COPY's CSV spells NULL as an unquoted empty field and nothing else, so that is the only
#: null: text is never null (an exchange ``NA`` or ``null`` is text, not Arrow's default
#: null spellings), and a decimal is null only where the column holds NULL. ``created_at``
#: travels as integer microseconds (``DateStyle`` cannot change how it is spelled).
_CSV_CONVERT: Final = pacsv.ConvertOptions(
    column_types={
        **dict(zip(_CSV_NAMES[:-1], arrow_schema(_CSV_NAMES[:-1]).types, strict=True)),
        "created_at": pa.int64(),
    },
    null_values=[""],
    strings_can_be_null=False,
    quoted_strings_can_be_null=False,
)
_TABLE: Final = OrderbookData.__tablename__
_ARCHIVED: Final = (
    f"SELECT file FROM {LakeRange.__tablename__}, unnest(files) AS file"
    " WHERE start_us < $2 AND end_us > $1"
)
_NEXT: Final = (
    f"SELECT min(timestamp) FROM {_TABLE} WHERE symbol = $1 AND timestamp >= $2 AND timestamp < $3"
)
#: Exact on every supported server: EXTRACT gives numeric from PostgreSQL 14 on; before, a
#: double whose error (< 0.5 µs for any date before 2100) the cast to int8 rounds away.
_QUERY: Final = (
    "SELECT exchange, timestamp, local_timestamp, "
    + ", ".join(DECIMAL_COLUMNS)
    + ", id, (EXTRACT(EPOCH FROM created_at) * 1000000)::int8"
    + f" FROM {_TABLE}"
    " WHERE symbol = $1 AND timestamp >= $2 AND timestamp < $3 ORDER BY timestamp, id"
)


@dataclass
class ExportSummary:
    """What an export wrote: rows, and each file's location (a path, or ``s3://...``)."""

    rows: int = 0
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def location(lake: Lake, relative_path: str) -> str:
    """Where a lake file is, as a user names it: a local path or ``s3://bucket/key``."""
    path = lake.path(relative_path)
    return path if lake.is_local else f"s3://{path}"


@contextlib.contextmanager
def lake_errors(lake: Lake) -> Iterator[None]:
    """Turn the filesystem's ``OSError`` into ``LakeUnavailable`` naming the lake and the fix."""
    try:
        yield
    except LakeUnavailable:
        raise
    except OSError as exc:
        said = str(exc).strip().splitlines()
        detail = said[0] if said else type(exc).__name__
        check = (
            "check that the directory can be written"
            if lake.is_local
            else "check LAKE_URL (the bucket must exist), LAKE_ENDPOINT_URL, LAKE_REGION and "
            "the key (LAKE_ACCESS_KEY_ID, LAKE_SECRET_ACCESS_KEY)"
        )
        raise LakeUnavailable(f"the lake {lake.url} cannot be used ({detail}): {check}") from exc


def _symbol_files(lake: Lake, symbol: str) -> list[str]:
    """Paths of ``symbol``'s files, relative to the root: one listing of the root's
    ``exchange=`` directories, then one of ``symbol=<symbol>`` under each (never the rest)."""
    top = lake.filesystem.get_file_info(fs.FileSelector(lake.root, allow_not_found=True))
    found: list[str] = []
    for entry in top:
        if entry.type != fs.FileType.Directory or not entry.base_name.startswith("exchange="):
            continue
        selector = fs.FileSelector(
            f"{entry.path}/symbol={quote(symbol, safe='')}", recursive=True, allow_not_found=True
        )
        found.extend(
            lake.relative(info.path)
            for info in lake.filesystem.get_file_info(selector)
            if info.type == fs.FileType.File
        )
    return sorted(found)


def check_overlaps(lake: Lake, symbol: str, start_us: int, end_us: int) -> None:
    """Refuse a range that partly overlaps files already in the lake (see the module doc)."""
    for relative in _symbol_files(lake, symbol):
        ref = LakeFileRef.match(relative)
        if ref is None:
            continue
        low, high = ref.low_us, ref.high_us
        mine = day_bounds(ref.day, start_us, end_us)
        if mine[0] < mine[1] and low < mine[1] and mine[0] < high and (low, high) != mine:
            raise ConfigError(
                f"export: {location(lake, relative)} already holds [{low}, {high}) µs, which "
                f"overlaps this export's [{mine[0]}, {mine[1]}) on {ref.day}; export elsewhere, "
                "export exactly the ranges already there, or delete those files first"
            )


def check_archived(
    lake: Lake, archived: list[str], symbol: str, start_us: int, end_us: int
) -> None:
    """Refuse to replace a file the lake's catalog records (``archived``: relative paths):
    after ``prune`` it may be the only copy of its rows, and an export holds only what
    PostgreSQL still has."""
    for relative in archived:
        ref = LakeFileRef.match(relative)
        if ref is None or ref.symbol != symbol:
            continue
        if (ref.low_us, ref.high_us) == day_bounds(ref.day, start_us, end_us):
            raise ConfigError(
                f"export: {location(lake, relative)} is an archived file in the lake's catalog "
                "(written and verified by `archive`); an export would replace it with only the "
                "rows PostgreSQL still holds. Export elsewhere with --out"
            )


def _parse(data: bytes) -> pa.Table:
    return pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=_CSV_NAMES),
        convert_options=_CSV_CONVERT,
    )


class _DayFiles:
    """The files of one date being written, one per exchange."""

    def __init__(self, lake: Lake, symbol: str, day: dt.date, bounds: tuple[int, int]) -> None:
        self.lake, self.symbol, self.day, self.bounds = lake, symbol, day, bounds
        self.files: dict[str, LakeFile] = {}

    def write(self, exchange: str, rows: pa.Table, summary: ExportSummary) -> None:
        lake_file = self.files.get(exchange)
        if lake_file is None:
            relative = f"{day_dir(exchange, self.symbol, self.day)}/{file_name(*self.bounds)}"
            lake_file = self.files[exchange] = LakeFile(self.lake, relative)
            summary.files.append(location(self.lake, relative))
        lake_file.write(rows)

    def finish(self) -> None:
        while self.files:
            self.files.popitem()[1].commit()

    def abandon(self) -> None:
        while self.files:
            self.files.popitem()[1].abandon()


async def export_parquet(
    engine: AsyncEngine,
    *,
    symbol: str,
    start_us: int,
    end_us: int,
    out: Path | Lake,
    on_rows: Callable[[int], None] | None = None,
) -> ExportSummary:
    """Write ``symbol``'s quotes with ``start_us <= timestamp < end_us`` into ``out`` (a
    directory or a ``Lake``), in the lake format.

    Returns the rows and files written. Costs two indexed range queries per hour that has
    data; empty stretches cost one query each, however long. Raises ``ConfigError`` for a
    range that partly overlaps files already there, or (into a ``Lake``) that would replace a
    file the lake's catalog records; ``LakeUnavailable`` when the lake cannot be used.
    """
    started = time.perf_counter()
    lake = directory_lake(out) if isinstance(out, Path) else out
    summary = ExportSummary()
    day_files: _DayFiles | None = None
    low = start_us
    try:
        async with engine.connect() as conn:
            raw = await raw_connection(conn)
            if not isinstance(out, Path):  # the lake: archive's files are not export's to replace
                archived = [row[0] for row in await raw.fetch(_ARCHIVED, start_us, end_us)]
                check_archived(lake, archived, symbol, start_us, end_us)
            with lake_errors(lake):
                check_overlaps(lake, symbol, start_us, end_us)
            while low < end_us:
                # Jump over empty stretches: the next quote decides the next window.
                found = await raw.fetchval(_NEXT, symbol, low, end_us)
                if found is None:
                    break
                window_end = min(end_us, found - found % WINDOW_US + WINDOW_US)
                day = day_of_us(found)
                if day_files is None or day_files.day != day:
                    if day_files is not None:
                        with lake_errors(lake):
                            day_files.finish()
                    day_files = _DayFiles(lake, symbol, day, day_bounds(day, start_us, end_us))
                sink = io.BytesIO()
                await raw.copy_from_query(
                    _QUERY, symbol, found, window_end, output=sink, format="csv"
                )
                low = window_end
                if not sink.tell():
                    continue
                rows = _parse(sink.getvalue())
                with lake_errors(lake):
                    for exchange in pc.unique(rows.column("exchange")).to_pylist():
                        part = rows.filter(pc.equal(rows.column("exchange"), exchange))
                        day_files.write(exchange, part, summary)
                summary.rows += rows.num_rows
                if on_rows is not None:
                    on_rows(rows.num_rows)
        if day_files is not None:
            with lake_errors(lake):
                day_files.finish()
    except BaseException:
        if day_files is not None:
            day_files.abandon()
        raise
    summary.seconds = time.perf_counter() - started
    return summary
