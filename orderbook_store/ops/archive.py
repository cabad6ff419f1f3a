"""Archiving: closed partitions copied to the lake, verified, and recorded in its catalog.

``archive(engine, lake, older_than)`` takes every partition whose whole range ends at or
before the cutoff (never the default partition) and not yet in ``orderbook_lake_ranges``, and
for each one:

1. takes the range's advisory lock in a transaction of its own (held until step 4), and looks
   in the catalog again: a range another run recorded meanwhile is skipped;
2. in one ``REPEATABLE READ`` snapshot of the partition, sums its rows per exchange, symbol and
   UTC date (``files.lake_checksum``: counts and exact sums, in one aggregate) and streams each
   such group out with ``COPY ... TO STDOUT`` in (timestamp, id) order into its lake file
   (``files.lake_format``: one file per exchange/symbol/date, named by the part of the date the
   partition covers, so a rerun writes the same names): memory holds a few MB of rows at a time,
   whatever the partition's size;
3. reads each file back from the lake, row group by row group, and checks its rows and checksum
   against its group's; a file that differs is removed and the run stops (``ArchiveError``);
4. records the range (its rows and checksum, symbols, files, format version, lake URL) and
   commits, which releases the lock.

So an entry exists only for a range whose files are all written and verified: a run killed
at any point leaves no entry (at most files the next run writes again under the same names,
or hidden temporary files readers skip), and two runs at once archive each partition once
(the lock, and the catalog's unique range). ``prune`` drops only recorded partitions, and checks
the partition against its entry once it is detached (``reverify``): rows that arrived after
archiving make it archive the partition again (``replace=True``) before it drops it.
"""

from __future__ import annotations

import datetime as dt
import io
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orderbook_store.errors import OrderbookStoreError
from orderbook_store.files import lake_store
from orderbook_store.files.lake_checksum import Totals, table_totals, totals_sql
from orderbook_store.files.lake_format import (
    DAY_US,
    FILE_COLUMNS,
    FORMAT_VERSION,
    LakeFile,
    LakeFileRef,
    day_bounds,
    day_dir,
    day_of_us,
    file_name,
)
from orderbook_store.files.lake_store import Lake
from orderbook_store.ops import lake_catalog as catalog
from orderbook_store.ops.lake_catalog import LakeEntry
from orderbook_store.pg.connection import raw_connection
from orderbook_store.times import from_us

__all__ = [
    "ARCHIVE_LOCK_CLASS",
    "ArchiveError",
    "ArchiveResult",
    "ArchivedPartition",
    "archivable",
    "archive",
    "archive_partition",
    "directory_lake",
    "file_groups",
    "missing_files",
]

if TYPE_CHECKING:
    from orderbook_store.ops.partitions import PartitionInfo

ProgressFn = Callable[[str], None]

#: First key of the per-range advisory lock (the second is a hash of the range).
ARCHIVE_LOCK_CLASS: Final = 0x0B5_9A29

#: COPY output gathered before it is parsed and written: a few MB of rows at a time.
CHUNK_BYTES: Final = 8 << 20

_COPY_COLUMNS: Final = ", ".join(f'"{name}"' for name in FILE_COLUMNS)


class ArchiveError(OrderbookStoreError):
    """A partition could not be archived; nothing was recorded for it."""


class PartlyRestored(ArchiveError):
    """The partition's range was dropped to the lake, and the table holds rows of it again
    (late rows given a partition by ``ensure``, or a ``restore`` of some of its files).
    Archiving it would replace the lake's files with only those rows, so it is left alone
    until ``restore`` brings the whole range back."""


@dataclass(frozen=True)
class FileGroup:
    """The rows of one exchange/symbol/date of a partition, and their totals."""

    exchange: str
    symbol: str
    day: dt.date
    totals: Totals

    @property
    def day_start_us(self) -> int:
        """Start of the group's date, in µs."""
        return (self.day - dt.date(1970, 1, 1)).days * DAY_US

    def relative_path(self, start_us: int, end_us: int) -> str:
        """The lake file of this group when archiving the range ``[start_us, end_us)``."""
        bounds = day_bounds(self.day, start_us, end_us)
        return f"{day_dir(self.exchange, self.symbol, self.day)}/{file_name(*bounds)}"


@dataclass
class ArchivedPartition:
    """One partition archived: its range, rows, files (relative to the lake) and costs."""

    name: str
    start_us: int
    end_us: int
    rows: int
    checksum: str
    files: list[str]
    bytes: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ArchiveResult:
    """What ``archive`` did: partitions archived, and those already in the catalog."""

    lake_url: str
    archived: list[ArchivedPartition] = field(default_factory=list)
    already_archived: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(a.rows for a in self.archived)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, plus the total rows."""
        return asdict(self) | {"rows": self.rows}


def directory_lake(directory: str | Path) -> Lake:
    """A local directory as a lake (``prune --archive DIR``), made if missing."""
    try:
        return lake_store.directory_lake(directory)
    except OSError as exc:
        raise ArchiveError(
            f"archive directory {str(directory)!r}: cannot create it ({exc})"
        ) from None


async def archivable(
    engine: AsyncEngine,
    older_than: dt.timedelta | dt.datetime | dt.date,
    *,
    now: dt.datetime | None = None,
) -> list[PartitionInfo]:
    """Closed partitions older than the cutoff with no catalog entry (what ``archive`` does)."""
    from orderbook_store.ops import partitions

    found = await partitions.prunable(engine, older_than, now=now)
    async with engine.connect() as conn:
        todo = []
        for part in found:
            assert part.start_us is not None and part.end_us is not None
            if await catalog.entry_for(conn, part.start_us, part.end_us) is None:
                todo.append(part)
    return todo


async def archive(
    engine: AsyncEngine,
    lake: Lake,
    older_than: dt.timedelta | dt.datetime | dt.date,
    *,
    now: dt.datetime | None = None,
    progress: ProgressFn | None = None,
) -> ArchiveResult:
    """Archive every closed partition older than ``older_than`` (an age, or a UTC moment or
    date) that the catalog does not hold yet; see the module docstring. Idempotent and
    resumable; ``progress`` gets one line per partition (rows, files, MB, rows/s)."""
    from orderbook_store.ops import partitions

    say = progress or (lambda _line: None)
    result = ArchiveResult(lake_url=lake.url)
    for part in await partitions.prunable(engine, older_than, now=now):
        assert part.start_us is not None and part.end_us is not None
        done = await archive_partition(engine, lake, part.name, part.start_us, part.end_us, say)
        if done is None:
            result.already_archived.append(part.name)
        else:
            result.archived.append(done)
    return result


async def archive_partition(
    engine: AsyncEngine,
    lake: Lake,
    name: str,
    start_us: int,
    end_us: int,
    progress: ProgressFn | None = None,
    *,
    replace: bool = False,
) -> ArchivedPartition | None:
    """Archive table ``name`` (a partition of ``[start_us, end_us)``, attached or detached)
    and record it; ``None`` when the range is recorded already (in this lake or another), or
    the table was dropped meanwhile (``prune --yes``).
    ``replace=True`` archives it again into ``lake`` and rewrites the entry (rows that
    arrived after the first archive)."""
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    async with engine.connect() as lock_conn, lock_conn.begin():
        await lock_conn.execute(
            text("SELECT pg_advisory_xact_lock(:k, hashtext(:range))"),
            {"k": ARCHIVE_LOCK_CLASS, "range": f"{start_us}-{end_us}"},
        )
        # READ COMMITTED: this statement sees an entry committed while we waited.
        existing = await _check_catalog(lock_conn, lake, name, start_us, end_us)
        if existing is not None and existing.dropped:
            raise PartlyRestored(
                f"{name}: its range is in the lake ({existing.rows:,} rows, dropped from "
                "PostgreSQL) and the table holds rows of it again; archiving them would replace "
                "the lake's files, so it stays: run `orderbook-store restore --start "
                f"{from_us(start_us).isoformat()} --end {from_us(end_us).isoformat()}` to "
                "bring the whole range back, then prune again"
            )
        if existing is not None and not replace:
            where = "" if existing.lake_url == lake.url else f" in {existing.lake_url}"
            say(f"{name} is archived already{where} ({existing.rows:,} rows)")
            return None
        gone = await lock_conn.execute(text("SELECT to_regclass(:t) IS NULL"), {"t": f'"{name}"'})
        if gone.scalar():
            say(f"{name} is gone (dropped meanwhile, without an archive): nothing to archive")
            return None
        try:
            totals, paths, size = await _write_and_verify(engine, lake, name, start_us, end_us)
        except OSError as exc:  # the lake's filesystem: unreachable, refused, full
            raise ArchiveError(
                f"archiving {name} to {lake.url} failed ({exc}); nothing was recorded, "
                "run archive again once the lake is reachable"
            ) from exc
        entry = LakeEntry(
            partition_name=name,
            start_us=start_us,
            end_us=end_us,
            symbols=sorted({group.symbol for group in paths}),
            rows=totals.rows,
            checksum=totals.digest(),
            files=[paths[group] for group in paths],
            format_version=FORMAT_VERSION,
            lake_url=lake.url,
        )
        if existing is None:
            await catalog.record(lock_conn, entry)
        else:
            await catalog.replace(lock_conn, entry)
    for relative in entry.files:
        for superseded in remove_superseded(lake, relative):
            say(f"removed {superseded}: {relative} holds its rows")
    done = ArchivedPartition(
        name,
        start_us,
        end_us,
        entry.rows,
        entry.checksum,
        entry.files,
        size,
        time.perf_counter() - started,
    )
    say(
        f"archived {name}: {done.rows:,} rows, {len(done.files)} files, "
        f"{done.bytes / 1e6:.1f} MB, {done.rows_per_s:,.0f} rows/s"
    )
    return done


async def _check_catalog(
    conn: AsyncConnection, lake: Lake, name: str, start_us: int, end_us: int
) -> LakeEntry | None:
    """The range's entry, if any (in this lake or another); ``ArchiveError`` for an entry
    overlapping the range without being it (its files would overlap this one's)."""
    for entry in await catalog.overlapping(conn, start_us, end_us):
        if (entry.start_us, entry.end_us) != (start_us, end_us):
            raise ArchiveError(
                f"{name} covers [{start_us}, {end_us}) µs, which overlaps the archived range "
                f"[{entry.start_us}, {entry.end_us}) of {entry.partition_name}; restore that "
                "range with the partitions it had, or archive it by hand"
            )
        return entry
    return None


async def file_groups(conn: Any, relation: str) -> list[FileGroup]:
    """Totals of ``relation``'s rows per exchange, symbol and UTC date (one aggregate), on an
    asyncpg connection, ordered as the files are written."""
    day = f'"timestamp" / {DAY_US}'
    sql = totals_sql(relation, group_by=("exchange", "symbol", day)) + " ORDER BY 1, 2, 3"
    groups = []
    for row in await conn.fetch(sql):
        exchange, symbol, days, *rest = tuple(row)
        groups.append(
            FileGroup(
                str(exchange), str(symbol), day_of_us(int(days) * DAY_US), Totals.from_row(rest)
            )
        )
    return groups


async def _write_and_verify(
    engine: AsyncEngine, lake: Lake, name: str, start_us: int, end_us: int
) -> tuple[Totals, dict[FileGroup, str], int]:
    """Steps 2 and 3: every group's file written and verified; the partition's totals, each
    group's file and the bytes written."""
    relation = f'"{name}"'
    paths: dict[FileGroup, str] = {}
    size = 0
    async with engine.connect() as conn:
        raw = await raw_connection(conn)
        async with raw.transaction(isolation="repeatable_read", readonly=True):
            await raw.execute("SET LOCAL DateStyle = 'ISO, YMD'")
            groups = await file_groups(raw, relation)
            for group in groups:
                relative = group.relative_path(start_us, end_us)
                written = await _write_group(raw, lake, relation, group, relative)
                size += _verify(lake, relative, group, written)
                paths[group] = relative
    return Totals.of(group.totals for group in groups), paths, size


async def _write_group(raw: Any, lake: Lake, relation: str, group: FileGroup, relative: str) -> int:
    """Stream one group's rows into its lake file; the rows written."""
    _remove_stale_temporaries(lake, relative)
    low, high = group.day_start_us, group.day_start_us + DAY_US
    query = (
        f"SELECT {_COPY_COLUMNS} FROM {relation} WHERE exchange = $1 AND symbol = $2 "
        f'AND "timestamp" >= {low} AND "timestamp" < {high} ORDER BY "timestamp", id'
    )
    target = LakeFile(lake, relative)
    pending: list[bytes] = []
    held = 0

    def flush(final: bool) -> None:
        nonlocal pending, held
        data = b"".join(pending)
        cut = len(data) if final else data.rfind(b"\n") + 1
        if cut:
            target.write(_parse(data[:cut]))
        pending = [data[cut:]] if cut < len(data) else []
        held = len(data) - cut

    async def take(chunk: bytes) -> None:
        nonlocal held
        pending.append(chunk)
        held += len(chunk)
        if held >= CHUNK_BYTES:
            flush(final=False)

    try:
        await raw.copy_from_query(query, group.exchange, group.symbol, output=take, format="csv")
        flush(final=True)
        target.commit()
    except BaseException:
        target.abandon()
        raise
    return target.rows


def _remove_stale_temporaries(lake: Lake, relative: str) -> None:
    """A killed run's hidden temporary files of the same name (ours: we hold the range's
    lock); one listing of the file's own directory."""
    from pyarrow import fs

    directory, _, name = lake.path(relative).rpartition("/")
    try:
        found = lake.filesystem.get_file_info(fs.FileSelector(directory))
    except (FileNotFoundError, OSError):
        return
    for info in found:
        if info.base_name.startswith(f".{name}.") and info.base_name.endswith(".tmp"):
            lake.filesystem.delete_file(info.path)


def remove_superseded(lake: Lake, relative: str) -> list[str]:
    """Delete the other files of ``relative``'s directory whose range lies within its own
    (an earlier ``export`` of part of that day into the lake): the archived file holds their
    rows, and an engine reading the lake's tree (DuckDB, Spark) would count them twice. Run
    once the catalog records ``relative``. Returns the deleted paths (relative)."""
    from pyarrow import fs

    mine = LakeFileRef.match(relative)
    if mine is None:
        return []
    directory = lake.path(relative).rpartition("/")[0]
    deleted = []
    for info in lake.filesystem.get_file_info(fs.FileSelector(directory)):
        other = LakeFileRef.match(lake.relative(info.path))
        if other is None or other.path == mine.path:
            continue
        if mine.low_us <= other.low_us and other.high_us <= mine.high_us:
            lake.filesystem.delete_file(info.path)
            deleted.append(other.path)
    return deleted


_PARSE: Final[dict[str, Any]] = {}


def _parse(data: bytes) -> Any:
    """COPY CSV rows of ``FILE_COLUMNS`` as an Arrow table of the lake's types."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from orderbook_store.files.lake_format import file_schema

    if not _PARSE:
        schema = file_schema()
        types = {
            f.name: pa.int64() if f.name in ("timestamp", "local_timestamp") else f.type
            for f in schema
        }
        _PARSE["read"] = pacsv.ReadOptions(column_names=list(FILE_COLUMNS))
        _PARSE["convert"] = pacsv.ConvertOptions(
            column_types=types,
            null_values=[""],
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
    return pacsv.read_csv(
        io.BytesIO(data), read_options=_PARSE["read"], convert_options=_PARSE["convert"]
    )


def missing_files(lake: Lake, files: list[str]) -> list[str]:
    """Those of ``files`` (relative to the lake's root) the lake does not hold."""
    from pyarrow import fs

    if not files:
        return []
    infos = lake.filesystem.get_file_info([lake.path(f) for f in files])
    return [f for f, info in zip(files, infos, strict=True) if info.type != fs.FileType.File]


def read_file_totals(lake: Lake, relative: str) -> tuple[Totals, int, bytes | None]:
    """A lake file's totals (row group by row group), its size and its format version."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orderbook_store.files.lake_format import FORMAT_KEY

    path = lake.path(relative)
    with lake.filesystem.open_input_file(path) as handle:
        stored = pq.ParquetFile(handle)
        version = (stored.schema_arrow.metadata or {}).get(FORMAT_KEY)
        totals = Totals()
        for batch in stored.iter_batches(batch_size=256 * 1024):
            totals = totals + table_totals(pa.Table.from_batches([batch]))
        size = int(handle.size())
    return totals, size, version


def _verify(lake: Lake, relative: str, group: FileGroup, written: int) -> int:
    """Step 3 for one file: rows and checksum as its group's, or the file goes and
    ``ArchiveError`` says what differed. Returns the file's size."""
    found, size, version = read_file_totals(lake, relative)
    if (
        found == group.totals
        and written == group.totals.rows
        and version == str(FORMAT_VERSION).encode()
    ):
        return size
    lake.filesystem.delete_file(lake.path(relative))
    raise ArchiveError(
        f"lake file {relative} read back holds {found.rows:,} rows (checksum "
        f"{found.digest()[:12]}, format {version!r}), the partition's rows of it "
        f"{group.totals.rows:,} (checksum {group.totals.digest()[:12]}): the file was removed "
        "and nothing was recorded"
    )
