"""Restore: archived rows of a range brought back from the lake into ``orderbook_data``.

``restore(engine, lake, start_us, end_us, symbol=None)`` reads the catalog entries meeting the
range (``ops.lake_catalog``), makes the partitions of their periods first (``partitions.ensure``
with ``since``/``until``, so rows land in a partition of their own, not in the default one),
then brings back each listed file of a wanted symbol, one transaction per file:

* the file's rows in the range go, every column as archived (the original ``id`` and
  ``created_at`` too: ids come from the table's one sequence, which never hands out an
  archived row's id again; were it reset, it is moved past them), into a temporary table;
* one ``INSERT ... SELECT`` through the parent table stores those the table does not hold
  already, by the importers' rule (``files.importers.dedupe``: the same quote is equal
  exchange, symbol, timestamp, local_timestamp and four values; a quote the file holds ``n``
  times and the table ``m`` times is stored ``n - m`` more times, keeping the ids of the
  copies not stored yet). So a second restore adds 0, and a range half restored is completed.

Each file of a dropped range comes back whole, and is noted in the entry's ``restored_files``
in the transaction that stores its rows: reads then take those rows from PostgreSQL and skip
the file, so no row is read from both tiers. Part of such a file is refused (widen the range
to whole UTC days). When every file of an entry is back, its ``dropped_at`` is cleared: reads
take the range from PostgreSQL again. Restores take turns (an advisory lock per file).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.errors import ConfigError, OrderbookStoreError
from orderbook_store.files.importers.dedupe import planned_for_bulk, same_quote
from orderbook_store.files.lake_format import FILE_COLUMNS, LakeFileRef
from orderbook_store.files.lake_store import Lake
from orderbook_store.models import QUOTE_COLUMNS, TABLE_COLUMNS, OrderbookData
from orderbook_store.ops import lake_catalog as catalog
from orderbook_store.ops.lake_catalog import LakeEntry
from orderbook_store.pg.connection import raw_connection
from orderbook_store.times import day_of, from_us

__all__ = ["RESTORE_LOCK_KEY", "RestoreError", "RestoreResult", "restore"]

ProgressFn = Callable[[str], None]

#: Key of the advisory lock each file's transaction holds (restores take turns).
RESTORE_LOCK_KEY: Final = 0x0B5_9A2A

PENDING: Final = "orderbook_restore_pending"
_TABLE: Final = OrderbookData.__tablename__
_ALL: Final = ", ".join(f'"{c}"' for c in TABLE_COLUMNS)
_KEY: Final = ", ".join(f'"{c}"' for c in QUOTE_COLUMNS)
#: The order of the CSV sent to the pending table.
_CSV_COLUMNS: Final = ("exchange", "symbol", *FILE_COLUMNS)


class RestoreError(OrderbookStoreError):
    """A range could not be restored; what each file's transaction committed stays."""


@dataclass
class RestoreResult:
    """What ``restore`` did: rows read from the lake, rows stored, rows already there."""

    rows_read: int = 0
    rows_added: int = 0
    files: list[str] = field(default_factory=list)
    #: Ranges ``[start_us, end_us)`` whose ``dropped_at`` was cleared.
    ranges_back: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows_skipped(self) -> int:
        return self.rows_read - self.rows_added

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, plus the rows skipped."""
        return asdict(self) | {"rows_skipped": self.rows_skipped}


async def restore(
    engine: AsyncEngine,
    lake: Lake,
    start_us: int,
    end_us: int,
    symbol: str | None = None,
    *,
    progress: ProgressFn | None = None,
) -> RestoreResult:
    """Bring the archived rows with ``start_us <= timestamp < end_us`` (of ``symbol`` only,
    when given) back into ``orderbook_data``, exactly and idempotently (module docstring)."""
    from orderbook_store.ops import partitions

    if end_us <= start_us:
        raise ConfigError(f"restore: end ({end_us}) must be after start ({start_us})")
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    result = RestoreResult()
    async with engine.connect() as conn:
        entries = await catalog.overlapping(conn, start_us, end_us)
    if not entries:
        say("the lake's catalog holds nothing of this range")
        return result
    for entry in entries:
        if entry.lake_url != lake.url:
            raise RestoreError(
                f"[{entry.start_us}, {entry.end_us}) µs is archived in the lake "
                f"{entry.lake_url!r}, not in {lake.url!r}: point LAKE_URL at that lake"
            )
    _refuse_part_of_a_file(entries, start_us, end_us, symbol)
    low = max(start_us, min(e.start_us for e in entries))
    high = min(end_us, max(e.end_us for e in entries))
    made = await partitions.ensure(engine, ahead=0, since=day_of(low), until=day_of(high - 1))
    if made.created:
        say(f"made partitions {', '.join(made.created)}")
    for entry in entries:
        whole = await _restore_entry(engine, lake, entry, start_us, end_us, symbol, result, say)
        if whole and entry.dropped:
            async with engine.begin() as conn:
                await catalog.clear_dropped(conn, entry.start_us, entry.end_us)
            result.ranges_back.append((entry.start_us, entry.end_us))
            say(f"{entry.partition_name} is back in PostgreSQL whole")
    result.seconds = time.perf_counter() - started
    return result


def _wanted_files(
    entry: LakeEntry, start_us: int, end_us: int, symbol: str | None
) -> list[LakeFileRef]:
    """The entry's files of ``symbol`` (any when ``None``) meeting ``[start_us, end_us)``."""
    refs = [LakeFileRef.parse(relative) for relative in entry.files]
    return [
        ref
        for ref in refs
        if (symbol is None or ref.symbol == symbol)
        and ref.low_us < end_us
        and ref.high_us > start_us
    ]


def _refuse_part_of_a_file(
    entries: list[LakeEntry], start_us: int, end_us: int, symbol: str | None
) -> None:
    """A dropped range comes back a whole file at a time: reads then skip that file, so its
    rows are read from one tier only. Part of a file would leave its rows in both."""
    for entry in entries:
        if not entry.dropped:
            continue  # the partition is in PostgreSQL: reads never take this range from the lake
        for ref in _wanted_files(entry, start_us, end_us, symbol):
            if ref.low_us < start_us or ref.high_us > end_us:
                raise RestoreError(
                    f"restore: {ref.path} holds [{from_us(ref.low_us).isoformat()}, "
                    f"{from_us(ref.high_us).isoformat()}), which the range "
                    f"[{from_us(start_us).isoformat()}, {from_us(end_us).isoformat()}) covers "
                    "only in part; a dropped range is restored a whole file (a UTC day) at a "
                    "time: widen --start/--end to whole days. Nothing was restored"
                )


async def _restore_entry(
    engine: AsyncEngine,
    lake: Lake,
    entry: LakeEntry,
    start_us: int,
    end_us: int,
    symbol: str | None,
    result: RestoreResult,
    say: ProgressFn,
) -> bool:
    """Restore an entry's wanted files; True when that was the whole entry."""
    low, high = max(start_us, entry.start_us), min(end_us, entry.end_us)
    whole = (low, high) == (entry.start_us, entry.end_us)
    if symbol is not None and any(s != symbol for s in entry.symbols):
        whole = False
    for ref in _wanted_files(entry, low, high, symbol):
        if ref.path in entry.restored_files:
            continue
        read, added = await _restore_file(
            engine,
            lake,
            entry,
            ref,
            max(low, ref.low_us),
            min(high, ref.high_us),
        )
        relative = ref.path
        result.rows_read += read
        result.rows_added += added
        result.files.append(relative)
        say(f"restored {relative}: {added:,} of {read:,} rows added ({read - added:,} were there)")
    return whole


def _csv_batches(lake: Lake, relative: str, exchange: str, symbol: str, low: int, high: int) -> Any:
    """The file's rows with ``low <= timestamp < high``, as COPY CSV, a row group at a time."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    options = pacsv.WriteOptions(include_header=False)
    with lake.filesystem.open_input_file(lake.path(relative)) as handle:
        stored = pq.ParquetFile(handle)
        for batch in stored.iter_batches(batch_size=128 * 1024, columns=list(FILE_COLUMNS)):
            table = pa.Table.from_batches([batch])
            times = table.column("timestamp").cast(pa.int64())
            table = table.filter(pc.and_(pc.greater_equal(times, low), pc.less(times, high)))
            if not table.num_rows:
                continue
            columns = [
                pa.array([exchange] * table.num_rows, pa.string()),
                pa.array([symbol] * table.num_rows, pa.string()),
                *(
                    table.column(c).cast(pa.int64())
                    if c in ("timestamp", "local_timestamp")
                    else table.column(c)
                    for c in FILE_COLUMNS
                ),
            ]
            sink = io.BytesIO()
            pacsv.write_csv(pa.table(columns, names=list(_CSV_COLUMNS)), sink, options)
            yield table.num_rows, sink.getvalue()


#: The id sequence moved past the restored ids if it is not already (it always is, unless it
#: was reset): a new quote never gets the id of a restored one.
_SEQUENCE_PAST_SQL: Final = f"""
SELECT setval(s.seq, m.top)
FROM (SELECT pg_get_serial_sequence('{_TABLE}', 'id')::regclass AS seq) s,
     (SELECT max(id) AS top FROM {PENDING}) m
WHERE m.top > (SELECT coalesce(last_value, 0) FROM pg_sequences
               WHERE format('%I.%I', schemaname, sequencename)::regclass = s.seq)
"""


def _insert_sql(low: int, high: int) -> str:
    """The pending rows the table does not hold yet (multiset rule), every column kept."""
    return f"""
        WITH incoming AS (
            SELECT {_ALL}, row_number() OVER (PARTITION BY {_KEY} ORDER BY id) AS copy
            FROM {PENDING}
        ), stored AS (
            SELECT {_KEY}, count(*) AS copies
            FROM {_TABLE}
            WHERE exchange = $1 AND symbol = $2 AND "timestamp" >= {int(low)}
              AND "timestamp" < {int(high)}
            GROUP BY {_KEY}
        )
        INSERT INTO {_TABLE} ({_ALL})
        SELECT {", ".join(f'i."{c}"' for c in TABLE_COLUMNS)}
        FROM incoming i LEFT JOIN stored s ON {same_quote("i", "s")}
        WHERE i.copy > coalesce(s.copies, 0)
        ORDER BY i."timestamp", i.id
    """


async def _restore_file(
    engine: AsyncEngine,
    lake: Lake,
    entry: LakeEntry,
    ref: LakeFileRef,
    low: int,
    high: int,
) -> tuple[int, int]:
    """One file's rows in ``[low, high)`` restored in one transaction: (read, added). A file
    of a dropped range is noted as restored in the same transaction (reads skip it)."""
    relative, exchange, symbol = ref.path, ref.exchange, ref.symbol
    read = 0
    async with engine.begin() as conn:
        # Through SQLAlchemy first: that begins the transaction the raw statements run in.
        await conn.execute(text(f"SELECT pg_advisory_xact_lock({RESTORE_LOCK_KEY})"))
        raw = await raw_connection(conn)
        await raw.execute(f"CREATE TEMP TABLE {PENDING} (LIKE {_TABLE}) ON COMMIT DROP")
        try:
            for rows, data in _csv_batches(lake, relative, exchange, symbol, low, high):
                await raw.copy_to_table(
                    PENDING, source=memoryview(data), columns=list(_CSV_COLUMNS), format="csv"
                )
                read += rows
        except (OSError, ValueError) as exc:
            raise RestoreError(f"lake file {relative}: cannot be read ({exc})") from exc
        added = 0
        if read:
            await raw.execute(f"ANALYZE {PENDING}")
            async with planned_for_bulk(raw):
                status = await raw.execute(_insert_sql(low, high), exchange, symbol)
            await raw.execute(_SEQUENCE_PAST_SQL)
            added = int(status.rsplit(" ", 1)[-1])
        if entry.dropped:
            await catalog.note_restored(conn, entry.start_us, entry.end_us, relative)
    return read, added
