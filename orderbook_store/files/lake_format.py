"""The lake format: how quotes are laid out as Parquet, for ``export`` and archiving alike.

Layout (hive partitioning, values URI-escaped as hive does)::

    <root>/exchange=<exchange>/symbol=<symbol>/date=<YYYY-MM-DD>/part-<from>-<to>.parquet

``date`` is the UTC date of ``timestamp``; ``<from>``/``<to>`` are the microsecond bounds of the
part of that date the file covers (a whole day is always the same name). ``exchange``,
``symbol`` and ``date`` live in the path only; DuckDB, polars, Spark and pyarrow datasets add
them back from it.

Each file holds ``FILE_COLUMNS``, typed from the model (``models.arrow_schema``):
``timestamp``/``local_timestamp`` as ``timestamp[us, UTC]``, the four prices and amounts as
``decimal128(20, 8)`` (exact), ``id`` as int64 and ``created_at`` as ``timestamp[us]``, so a
file restores every column of its rows. Rows are in (``timestamp``, ``id``) order, in row
groups of ``ROW_GROUP_ROWS`` with statistics, so a reader of a time range skips whole row
groups. Compression is zstd; the rising integers and times are delta-encoded and the decimals
dictionary-encoded, which brings a real quote to under 10 bytes (``docs/lake-format.md``).
The schema metadata carries ``FORMAT_KEY: FORMAT_VERSION``.

A file is complete or absent: it is written under a hidden name (``.part-....tmp``: pyarrow
and Spark skip names starting with ``.``, a ``*.parquet`` glob does not match it) and moved to
its final name when complete: a rename on a local disk, a server-side copy on S3. So a failed
write never shows a partial file, nor removes the file an earlier write of the same range
left there. (A run killed mid-write on S3 can leave a hidden ``.tmp`` object or an unfinished
multipart upload, which no reader sees; a bucket lifecycle rule clears the latter.)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, unquote

from orderbook_store.models import DECIMAL_COLUMNS, LakeRange, arrow_schema

if TYPE_CHECKING:
    from orderbook_store.files.lake_store import Lake

__all__ = [
    "FILE_COLUMNS",
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "ROW_GROUP_ROWS",
    "LakeFile",
    "LakeFileRef",
    "day_dir",
    "file_name",
    "file_schema",
    "partitioning",
]

FORMAT_KEY: Final = b"orderbook_store.lake_format"
FORMAT_VERSION: Final = 1
DAY_US: Final = 86_400_000_000
#: Rows per row group: about a minute to an hour of one symbol, small enough that a short
#: range read skips most of a day, large enough that the per-group overhead is noise.
ROW_GROUP_ROWS: Final = 128 * 1024
#: The columns of every file, in order (partition columns live in the path).
FILE_COLUMNS: Final = ("timestamp", "local_timestamp", *DECIMAL_COLUMNS, "id", "created_at")
_DELTA_COLUMNS: Final = ("timestamp", "local_timestamp", "id", "created_at")


def file_schema() -> Any:
    """The ``pyarrow.Schema`` of a lake file, with the format version in its metadata."""
    schema = arrow_schema(FILE_COLUMNS, times_as_timestamps=True)
    return schema.with_metadata({FORMAT_KEY: str(FORMAT_VERSION).encode()})


def partitioning() -> Any:
    """The hive partitioning of the lake, typed, for ``pyarrow.dataset``."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    return ds.partitioning(
        pa.schema([("exchange", pa.string()), ("symbol", pa.string()), ("date", pa.date32())]),
        flavor="hive",
    )


def day_dir(exchange: str, symbol: str, day: dt.date) -> str:
    """The directory of one exchange/symbol/date, relative to the lake's root."""
    return (
        f"exchange={quote(exchange, safe='')}/symbol={quote(symbol, safe='')}"
        f"/date={day.isoformat()}"
    )


def file_name(low_us: int, high_us: int) -> str:
    """The name of the file covering ``[low_us, high_us)`` of one date."""
    return f"part-{low_us}-{high_us}.parquet"


_FILE_RE = re.compile(
    r"(?:^|/)exchange=([^/]*)/symbol=([^/]*)/date=(\d{4}-\d{2}-\d{2})"
    r"/part-(-?\d+)-(-?\d+)\.parquet$"
)


@dataclass(frozen=True)
class LakeFileRef:
    """One lake file, as its path describes it: whose rows, which ``[low_us, high_us)``."""

    path: str  # relative to the lake's root
    exchange: str
    symbol: str
    day: dt.date
    low_us: int
    high_us: int

    @classmethod
    def parse(cls, path: str) -> LakeFileRef:
        """The file a catalog entry names; ``RuntimeError`` for a path outside the layout."""
        found = cls.match(path)
        if found is None:
            raise RuntimeError(
                f"{LakeRange.__tablename__} names a file outside the lake layout: {path!r}"
            )
        return found

    @classmethod
    def match(cls, path: str) -> LakeFileRef | None:
        """The file ``path`` (relative to the root) names, or ``None`` for anything else in
        the tree (a temporary file, a stranger's file)."""
        found = _FILE_RE.search(path)
        if found is None:
            return None
        exchange, symbol, day, low, high = found.groups()
        return cls(
            path,
            unquote(exchange),
            unquote(symbol),
            dt.date.fromisoformat(day),
            int(low),
            int(high),
        )


def day_of_us(timestamp_us: int) -> dt.date:
    """The UTC date of a microsecond timestamp."""
    return dt.date(1970, 1, 1) + dt.timedelta(days=timestamp_us // DAY_US)


def day_bounds(day: dt.date, start_us: int, end_us: int) -> tuple[int, int]:
    """The part of ``day`` (UTC) that ``[start_us, end_us)`` covers, in µs."""
    day_start = (day - dt.date(1970, 1, 1)).days * DAY_US
    return max(start_us, day_start), min(end_us, day_start + DAY_US)


def writer_options() -> dict[str, Any]:
    """``pyarrow.parquet.ParquetWriter`` options of the format (see the module doc)."""
    return {
        "compression": "zstd",
        "use_dictionary": list(DECIMAL_COLUMNS),
        "column_encoding": dict.fromkeys(_DELTA_COLUMNS, "DELTA_BINARY_PACKED"),
        "write_statistics": True,
    }


class LakeFile:
    """One lake file being written: complete under its final path, or not there at all.

    ``write`` takes Arrow tables of ``FILE_COLUMNS`` (cast to the format's types), already in
    (timestamp, id) order; ``commit`` makes the file visible, ``abandon`` removes what exists.
    """

    def __init__(self, lake: Lake, relative_path: str) -> None:
        import pyarrow.parquet as pq

        self.lake = lake
        self.relative_path = relative_path
        self.path = lake.path(relative_path)
        directory, _, name = self.path.rpartition("/")
        lake.filesystem.create_dir(directory, recursive=True)
        self._temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
        self.schema = file_schema()
        self.rows = 0
        self._pending: list[Any] = []
        self._pending_rows = 0
        self._writer = pq.ParquetWriter(
            self._temporary, self.schema, filesystem=lake.filesystem, **writer_options()
        )

    def write(self, table: Any) -> None:
        """Append rows; rows are cast to the format's types first (names must match).

        Rows are held until a whole row group of ``ROW_GROUP_ROWS`` is there (or ``commit``),
        so many small writes still make full row groups.
        """
        table = table.select(list(FILE_COLUMNS)).cast(self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush(whole_groups_only=True)

    def _flush(self, *, whole_groups_only: bool) -> None:
        import pyarrow as pa

        pending = pa.concat_tables(self._pending)
        keep = pending.num_rows % ROW_GROUP_ROWS if whole_groups_only else 0
        ready = pending.slice(0, pending.num_rows - keep)
        if ready.num_rows:
            self._writer.write_table(ready, row_group_size=ROW_GROUP_ROWS)
        self._pending = [pending.slice(pending.num_rows - keep)] if keep else []
        self._pending_rows = keep

    def commit(self) -> str:
        """Close the file and give it its final name; returns its path relative to the root."""
        if self._pending:
            self._flush(whole_groups_only=False)
        self._writer.close()
        self.lake.filesystem.move(self._temporary, self.path)
        return self.relative_path

    def abandon(self) -> None:
        """Close and remove whatever was written."""
        try:
            self._writer.close()
        finally:
            with contextlib.suppress(OSError):  # nothing was written
                self.lake.filesystem.delete_file(self._temporary)
