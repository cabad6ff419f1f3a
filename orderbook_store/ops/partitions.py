"""Partition maintenance for ``orderbook_data`` (range partitions on the µs ``timestamp``).

Revision 0004 makes the table ``PARTITION BY RANGE (timestamp)`` with one partition per day
(or week, or month), a historical partition holding the rows that existed before, and a
``DEFAULT`` partition that takes any row no range covers, so writers never fail for a missing
partition. This module keeps it that way:

* ``ensure(engine, ahead=N)`` creates the partitions of the current period and the next ``N``,
  and moves rows that landed in the default partition into partitions of their own periods;
* ``list_partitions(engine)`` says what exists: name, range, estimated rows, size on disk;
* ``prune(engine, older_than, lake=...)`` drops partitions wholly older than the cutoff once
  the lake holds them, archived and verified (``ops.archive``, its catalog ``ops.lake_catalog``);
* ``compaction.compact(engine)`` rewrites closed partitions in (symbol, timestamp, id) order
  (its own module); ``PartitionInfo.compacted_at`` says which ones it did.

Boundaries are whole UTC periods (weeks start on Monday, like ``date_trunc('week')``).
Maintenance runs take a transaction-scoped advisory lock, so two deploys or collectors running
``ensure`` at once simply take turns. Creating a partition or moving rows takes the table's
``ACCESS EXCLUSIVE`` lock for the short moment it needs: writers wait (they do not fail), and
nothing is locked when there is nothing to do.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orderbook_store.errors import ConfigError, OrderbookStoreError
from orderbook_store.files.lake_store import Lake
from orderbook_store.models import TABLE_COLUMNS, OrderbookData
from orderbook_store.ops import lake_catalog
from orderbook_store.ops.symbols import forget_unstored_symbols
from orderbook_store.times import EPOCH_DATE, US_PER_DAY, day_of, from_us
from orderbook_store.times import day_start_us as to_us

Period = Literal["day", "week", "month"]
PERIODS: tuple[str, ...] = get_args(Period)

TABLE = OrderbookData.__tablename__
DEFAULT_PARTITION = f"{TABLE}_default"

#: Key of the advisory lock every maintenance run holds for its transaction.
ADVISORY_LOCK_KEY = 0x0B5_9A27  # "orderbook_store partitions"


#: Every column, in table order (what a move or an export carries).


def tidy_index_names(where: str) -> str:
    """A statement naming each partition's copy of a parent index ``<parent index>_<partition
    suffix>`` (``idx_orderbook_symbol_timestamp_p20240101``), so plans read like the plain
    table's. ``where`` picks the indexes (``child``: the partition's index, ``parent``: the
    parent's, ``t``: the partition, ``x``: its ``pg_index`` row). Revision 0004 runs the same
    statement (frozen there)."""
    return f"""
DO $names$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT child.relname AS child,
               left(parent.relname || '_' || regexp_replace(t.relname, '^orderbook_data_', ''), 63)
                   AS wanted
        FROM pg_inherits h
        JOIN pg_class child ON child.oid = h.inhrelid
        JOIN pg_class parent ON parent.oid = h.inhparent
        JOIN pg_index x ON x.indexrelid = child.oid
        JOIN pg_class t ON t.oid = x.indrelid
        WHERE {where}
    LOOP
        IF r.child <> r.wanted THEN
            EXECUTE format('ALTER INDEX %I RENAME TO %I', r.child, r.wanted);
        END IF;
    END LOOP;
END
$names$
"""


#: The copies of the table's indexes in every partition (after ``ensure`` makes partitions).
TIDY_INDEX_NAMES = tidy_index_names(
    "parent.relname IN ("
    "'idx_orderbook_symbol_timestamp', 'idx_orderbook_created_at', 'idx_orderbook_symbol')"
)

_BOUND = re.compile(r"FROM \('(-?\d+)'\) TO \('(-?\d+)'\)")

#: The order ``compact`` leaves a partition's rows in.
ORDER = "(symbol, timestamp, id)"

#: Reads the comment ``compacted_note`` writes on a compacted partition.
COMPACTED_NOTE = re.compile(r"^compacted at (\S+): (\d+) rows")

NOT_PARTITIONED = (
    f"{TABLE} is not partitioned: bring the schema to head first "
    "(orderbook-store upgrade, or alembic upgrade head)"
)


class PartitionError(OrderbookStoreError):
    """A partition maintenance step could not be done; the message says what to do."""


@dataclass(frozen=True)
class PartitionInfo:
    """One partition of ``orderbook_data``.

    ``start_us``/``end_us`` bound its range ``[start, end)`` in µs (``None`` for the default
    partition). ``estimated_rows`` is the planner's estimate (``None`` before the first
    ``ANALYZE``); ``size_bytes`` counts the heap and its indexes. ``compacted_at`` is when
    ``compact`` rewrote it in (symbol, timestamp, id) order (``None``: never).
    """

    name: str
    start_us: int | None
    end_us: int | None
    estimated_rows: int | None
    size_bytes: int
    compacted_at: dt.datetime | None = None

    @property
    def is_default(self) -> bool:
        """Whether this is the partition for rows outside every range."""
        return self.start_us is None and self.end_us is None and self.name == DEFAULT_PARTITION

    @property
    def start(self) -> dt.datetime | None:
        """Start of the range as an aware UTC datetime."""
        return None if self.start_us is None else from_us(self.start_us)

    @property
    def end(self) -> dt.datetime | None:
        """End of the range (exclusive) as an aware UTC datetime."""
        return None if self.end_us is None else from_us(self.end_us)


@dataclass
class EnsureResult:
    """What ``ensure`` did: partitions created (names) and rows moved out of the default."""

    period: Period
    created: list[str] = field(default_factory=list)
    moved_rows: int = 0


@dataclass
class PruneResult:
    """What ``prune`` did: partitions dropped, rows they held, and the lake files holding them
    (paths in the lake's filesystem: absolute paths for a directory)."""

    dropped: list[str] = field(default_factory=list)
    rows: int = 0
    files: list[str] = field(default_factory=list)
    #: Symbols no row holds any more, taken off ``orderbook_symbols`` (see ``ops.symbols``).
    forgotten: list[str] = field(default_factory=list)
    #: Partitions of ranges already dropped to the lake that hold rows again (``ensure``d late
    #: rows, a partial ``restore``): left for a whole ``restore`` (``archive.PartlyRestored``).
    kept: list[str] = field(default_factory=list)


# -- time arithmetic --------------------------------------------------------------------------


def period_start(day: dt.date, period: Period) -> dt.date:
    """First day of the period containing ``day`` (weeks start on Monday)."""
    if period == "day":
        return day
    if period == "week":
        return day - dt.timedelta(days=day.weekday())
    return day.replace(day=1)


def next_period(start: dt.date, period: Period) -> dt.date:
    """First day of the period after the one starting at ``start``."""
    if period == "day":
        return start + dt.timedelta(days=1)
    if period == "week":
        return start + dt.timedelta(days=7)
    return (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)


def check_period(period: str) -> Period:
    """``period`` as a ``Period``, or ``ConfigError`` naming the choices."""
    if period not in PERIODS:
        raise ConfigError(f"partition period {period!r}: must be one of {', '.join(PERIODS)}")
    return period  # type: ignore[return-value]


def _period_of(start_us: int, end_us: int) -> Period | None:
    """The period a partition's range spans exactly, if it is one whole aligned period."""
    if start_us % US_PER_DAY or end_us % US_PER_DAY:
        return None
    start, end = day_of(start_us), day_of(end_us)
    for period in get_args(Period):
        if period_start(start, period) == start and next_period(start, period) == end:
            return period  # type: ignore[no-any-return]
    return None


def infer_period(partitions: Sequence[PartitionInfo]) -> Period:
    """The period of the newest partition spanning exactly one period (``day`` when none does)."""
    ranged = [p for p in partitions if p.start_us is not None and p.end_us is not None]
    for part in sorted(ranged, key=lambda p: p.end_us or 0, reverse=True):
        found = _period_of(part.start_us or 0, part.end_us or 0)
        if found is not None:
            return found
    return "day"


def _gaps(start_us: int, end_us: int, taken: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of ``[start_us, end_us)`` that no range in ``taken`` covers."""
    gaps: list[tuple[int, int]] = []
    cursor = start_us
    for lo, hi in sorted(taken):
        if hi <= cursor or lo >= end_us:
            continue
        if lo > cursor:
            gaps.append((cursor, lo))
        cursor = max(cursor, hi)
        if cursor >= end_us:
            break
    if cursor < end_us:
        gaps.append((cursor, end_us))
    return gaps


# -- catalog ----------------------------------------------------------------------------------


def partitions_sql(*, sizes: bool = True) -> str:
    """The catalog query behind ``PartitionInfo``: one row per partition, for ``partition_of``."""
    size = "pg_total_relation_size(c.oid)" if sizes else "0"
    return f"""
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound,
               c.reltuples::bigint AS reltuples, {size} AS size,
               obj_description(c.oid, 'pg_class') AS note
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = to_regclass('{TABLE}')
    """


def partition_of(
    name: str, bound: str | None, reltuples: int, size: int, note: str | None
) -> PartitionInfo:
    """A row of ``partitions_sql`` as a ``PartitionInfo``."""
    match = _BOUND.search(bound or "")
    compacted = COMPACTED_NOTE.match(note or "")
    return PartitionInfo(
        name=name,
        start_us=int(match.group(1)) if match else None,
        end_us=int(match.group(2)) if match else None,
        estimated_rows=None if reltuples < 0 else int(reltuples),
        size_bytes=int(size),
        compacted_at=dt.datetime.fromisoformat(compacted.group(1)) if compacted else None,
    )


def compacted_note(at: dt.datetime, rows: int) -> str:
    """The table comment that records a compaction (``COMPACTED_NOTE`` reads it back)."""
    return f"compacted at {at.isoformat(timespec='seconds')}: {rows} rows ordered by {ORDER}"


async def _partitions(conn: AsyncConnection, *, sizes: bool = True) -> list[PartitionInfo]:
    is_partitioned = (
        await conn.execute(
            text("SELECT c.relkind = 'p' FROM pg_class c WHERE c.oid = to_regclass(:table)"),
            {"table": TABLE},
        )
    ).scalar()
    if not is_partitioned:
        raise PartitionError(NOT_PARTITIONED)
    rows = await conn.execute(text(partitions_sql(sizes=sizes)))
    found = [partition_of(*row) for row in rows]
    found.sort(key=lambda p: (p.start_us is None, p.start_us or 0, p.name))
    return found


async def list_partitions(engine: AsyncEngine) -> list[PartitionInfo]:
    """Every partition of ``orderbook_data``, ordered by range, the default partition last.

    Reads the catalog only (estimates, not counts): cheap at any size. Raises
    ``PartitionError`` when the table is not partitioned (schema older than revision 0004).
    """
    async with engine.connect() as conn:
        return await _partitions(conn)


# -- ensure -----------------------------------------------------------------------------------


async def _default_days(conn: AsyncConnection) -> list[dt.date]:
    result = await conn.execute(
        text(
            f'SELECT DISTINCT floor("timestamp" / {US_PER_DAY}.0)::bigint '
            f"FROM ONLY {DEFAULT_PARTITION}"
        )
    )
    return [EPOCH_DATE + dt.timedelta(days=int(days)) for (days,) in result]


async def _has_default(conn: AsyncConnection) -> bool:
    found = await conn.execute(
        text("SELECT to_regclass(:name) IS NOT NULL"), {"name": DEFAULT_PARTITION}
    )
    return bool(found.scalar())


def _plan(
    partitions: Sequence[PartitionInfo],
    period: Period,
    today: dt.date,
    ahead: int,
    default_days: Sequence[dt.date],
    since: dt.date | None = None,
    until: dt.date | None = None,
) -> list[tuple[int, int]]:
    """Ranges to create: wanted periods (upcoming ones, those from ``since`` on, those of
    default rows) not yet taken."""
    starts: set[dt.date] = set()
    start = period_start(today, period)
    for _ in range(ahead + 1):
        starts.add(start)
        start = next_period(start, period)
    last = start
    if since is not None:
        start = period_start(since, period)
        stop = (
            last if until is None else min(last, next_period(period_start(until, period), period))
        )
        while start < stop:
            starts.add(start)
            start = next_period(start, period)
    starts.update(period_start(day, period) for day in default_days)
    taken = [
        (p.start_us, p.end_us)
        for p in partitions
        if p.start_us is not None and p.end_us is not None
    ]
    ranges: list[tuple[int, int]] = []
    for start in sorted(starts):
        ranges.extend(_gaps(to_us(start), to_us(next_period(start, period)), taken))
    return ranges


def partition_name(start_us: int, end_us: int, existing: set[str]) -> str:
    name = f"{TABLE}_p{from_us(start_us):%Y%m%d}"
    if name in existing or start_us % US_PER_DAY:
        name = f"{TABLE}_p{from_us(start_us):%Y%m%d%H%M%S}_{from_us(end_us):%Y%m%d%H%M%S}"
    return name


#: Partitions one transaction creates at most. Each new partition holds about seven locks
#: (table, TOAST, four indexes) until commit, and the server's shared lock table has room for
#: only ``max_locks_per_transaction`` x ``max_connections``: a ``since`` years back creates
#: thousands, which in one transaction fail with "out of shared memory".
CREATE_BATCH = 50


async def ensure(
    engine: AsyncEngine,
    ahead: int = 7,
    *,
    period: Period | str | None = None,
    today: dt.date | None = None,
    since: dt.date | None = None,
    until: dt.date | None = None,
    lock_timeout_s: float | None = None,
) -> EnsureResult:
    """Create the partitions of the current period and the next ``ahead``; rehome default rows.

    Idempotent: a second run finds nothing to do and takes no table lock. Rows in the default
    partition are moved, ids unchanged, into new partitions for their periods, in the same
    transaction that creates them. ``period`` defaults to the period of the newest partition
    (that is, what the upgrade chose). ``today`` (UTC) is for tests. ``since`` also creates
    every period from that date on: run it before importing old data, so the rows go straight
    to their partitions instead of through the default one (moving many rows out of the
    default partition holds the table's lock while they move). More than ``CREATE_BATCH``
    partitions are created ``CREATE_BATCH`` per transaction, oldest first. ``until`` stops
    ``since``'s periods at the one holding that date (``restore`` makes only the periods of
    the range it brings back).
    ``lock_timeout_s`` bounds the wait for the table lock (``PartitionError`` past it), so a
    long reader never leaves writers queued behind this run.
    """
    if ahead < 0:
        raise ConfigError(f"ahead={ahead}: must be 0 or more periods")
    today = today if today is not None else dt.datetime.now(dt.timezone.utc).date()
    chosen = check_period(period) if period is not None else None
    result: EnsureResult | None = None
    while True:
        batch, more = await _ensure_batch(
            engine, ahead, chosen, today, since, lock_timeout_s, until
        )
        if result is None:
            result = batch
        else:
            result.created.extend(batch.created)
            result.moved_rows += batch.moved_rows
        chosen = batch.period
        if not more:
            return result


async def _ensure_batch(
    engine: AsyncEngine,
    ahead: int,
    period: Period | None,
    today: dt.date,
    since: dt.date | None,
    lock_timeout_s: float | None,
    until: dt.date | None = None,
) -> tuple[EnsureResult, bool]:
    """One transaction of ``ensure``: up to ``CREATE_BATCH`` partitions, with the default
    partition's rows that belong in them; True when more remain to create."""
    async with engine.begin() as conn:
        if lock_timeout_s is not None:
            await conn.execute(text(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'"))
        await _locked(conn, f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})", lock_timeout_s)
        partitions = await _partitions(conn, sizes=False)
        chosen = period if period is not None else infer_period(partitions)
        result = EnsureResult(period=chosen)
        has_default = await _has_default(conn)
        default_days = await _default_days(conn) if has_default else []
        if not _plan(partitions, chosen, today, ahead, default_days, since, until):
            return result, False

        # Work to do: from here on, writers wait until commit (they never see a half state).
        # ONLY: the parent's lock is what every insert and query through it needs first.
        await _locked(conn, f"LOCK TABLE ONLY {TABLE} IN ACCESS EXCLUSIVE MODE", lock_timeout_s)
        # Re-read under the lock: this is the truth now.
        partitions = await _partitions(conn, sizes=False)
        default_days = await _default_days(conn) if has_default else []
        planned = _plan(partitions, chosen, today, ahead, default_days, since, until)
        ranges = planned[:CREATE_BATCH]

        columns = ", ".join(f'"{c}"' for c in TABLE_COLUMNS)
        moving = bool(default_days) and bool(ranges)
        if moving:
            await conn.execute(
                text(f"CREATE TEMP TABLE orderbook_data_moving (LIKE {TABLE}) ON COMMIT DROP")
            )
            where = " OR ".join(
                f'("timestamp" >= {lo} AND "timestamp" < {hi})' for lo, hi in ranges
            )
            moved = await conn.execute(
                text(
                    f"WITH moved AS (DELETE FROM ONLY {DEFAULT_PARTITION} WHERE {where} "
                    f"RETURNING {columns}) "
                    f"INSERT INTO orderbook_data_moving ({columns}) SELECT {columns} FROM moved"
                )
            )
            result.moved_rows = moved.rowcount or 0
        names = {p.name for p in partitions}
        for lo, hi in ranges:
            name = partition_name(lo, hi, names)
            names.add(name)
            await conn.execute(
                text(f'CREATE TABLE "{name}" PARTITION OF {TABLE} FOR VALUES FROM ({lo}) TO ({hi})')
            )
            result.created.append(name)
        await conn.execute(text(TIDY_INDEX_NAMES))
        if moving and result.moved_rows:
            await conn.execute(
                text(f"INSERT INTO {TABLE} ({columns}) SELECT {columns} FROM orderbook_data_moving")
            )
        return result, len(planned) > len(ranges)


async def _locked(conn: AsyncConnection, statement: str, lock_timeout_s: float | None) -> None:
    """Run a locking statement; a lock timeout becomes a ``PartitionError`` saying what to do."""
    try:
        await conn.execute(text(statement))
    except DBAPIError as exc:
        if "lock timeout" not in str(exc):
            raise
        raise PartitionError(
            f"{TABLE} stayed locked by other sessions for more than {lock_timeout_s} s; "
            "nothing was changed, run ensure again later"
        ) from None


# -- prune ------------------------------------------------------------------------------------


def _cutoff_us(older_than: dt.timedelta | dt.datetime | dt.date, now: dt.datetime | None) -> int:
    if isinstance(older_than, dt.timedelta):
        moment = (now or dt.datetime.now(dt.timezone.utc)) - older_than
    elif isinstance(older_than, dt.datetime):
        moment = older_than
    else:
        return to_us(older_than)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return (moment - from_us(0)) // dt.timedelta(microseconds=1)


async def prunable(
    engine: AsyncEngine,
    older_than: dt.timedelta | dt.datetime | dt.date,
    *,
    now: dt.datetime | None = None,
) -> list[PartitionInfo]:
    """Partitions whose whole range ends at or before the cutoff (what ``prune`` would drop)."""
    cutoff = _cutoff_us(older_than, now)
    return [p for p in await list_partitions(engine) if p.end_us is not None and p.end_us <= cutoff]


#: Attempts to drop a partition whose rows keep changing after each archive of it.
DROP_ATTEMPTS = 3
#: The drop's detach needs the table to itself, and every insert queues behind a detach that
#: waits (for a notebook's long read, say): each attempt waits this long for a lock, then
#: lets the queue through and tries again, ...
DROP_LOCK_TIMEOUT_S = 0.2
#: ... for this long in all before prune gives up (nothing dropped).
DROP_LOCK_GIVE_UP_S = 600.0


class _Changed(Exception):
    """The partition no longer matches its archive (rows arrived, a file went missing)."""


async def prune(
    engine: AsyncEngine,
    older_than: dt.timedelta | dt.datetime | dt.date,
    archive_dir: str | Path | None = None,
    *,
    lake: Lake | None = None,
    confirm: bool = False,
    now: dt.datetime | None = None,
    progress: Callable[[str], None] | None = None,
) -> PruneResult:
    """Drop partitions wholly older than ``older_than`` (an age, or a UTC moment/date).

    With a ``lake`` (or ``archive_dir``, a local directory used as one), a partition is
    dropped only once its range is archived and verified there (``ops.archive``; archived
    first if the catalog has no entry for it). Then one transaction locks the partition
    against inserts (``SHARE``: reads carry on), checks it against its entry (rows and
    checksum) and the entry's files against the lake, and detaches and drops it and marks the
    range dropped in the catalog (reads then take it from the lake): a read sees the rows in
    PostgreSQL or in the lake, never in neither. Rows written into the partition after its
    archive (or a missing file) roll that transaction back and the partition is archived
    again, up to ``DROP_ATTEMPTS`` times. A failure or a kill leaves the partition as it was.
    Without a lake the rows are gone for good, so ``confirm=True`` is required. Symbols no
    row holds any more are taken off the list ``latest()`` reads (``ops.symbols``). Rows
    arriving later for a dropped range land in the default partition (and the next
    ``ensure`` gives them a partition again). ``progress`` is called with one line per step.
    The table's lock is taken for the detach only, once per partition.
    """
    from orderbook_store.ops import archive

    if lake is None and archive_dir is not None:
        lake = archive.directory_lake(archive_dir)
    if lake is None and not confirm:
        raise PartitionError(
            "prune without an archive deletes rows for good: configure a lake (LAKE_URL), "
            "pass an archive directory (--archive DIR) or confirm (--yes)"
        )
    say = progress or (lambda _line: None)
    result = PruneResult()
    for part in await prunable(engine, older_than, now=now):
        try:
            dropped = await _drop(engine, part, lake, say)
        except archive.PartlyRestored as kept:
            say(f"kept {kept}")
            result.kept.append(part.name)
            continue
        if dropped is None:  # another prune run took it first
            continue
        rows, files = dropped
        say(f"dropped {part.name} ({rows:,} rows)")
        result.dropped.append(part.name)
        result.rows += rows
        if lake is not None:
            result.files.extend(lake.path(relative) for relative in files)
    if result.dropped:
        result.forgotten = await forget_unstored_symbols(engine) or []
        if result.forgotten:
            say(f"no longer stored: {', '.join(result.forgotten)}")
    return result


async def _drop(
    engine: AsyncEngine, part: PartitionInfo, lake: Lake | None, say: Callable[[str], None]
) -> tuple[int, list[str]] | None:
    """Archive (with a lake), check and drop one partition: its rows and lake files, or
    ``None`` when it is no longer attached."""
    from orderbook_store.ops import archive

    assert part.start_us is not None and part.end_us is not None
    replace = False
    for _ in range(DROP_ATTEMPTS):
        if lake is not None:
            await archive.archive_partition(
                engine, lake, part.name, part.start_us, part.end_us, say, replace=replace
            )
        try:
            return await _check_and_drop_patiently(engine, part, lake, say)
        except _Changed as changed:
            say(f"{part.name}: {changed}; archiving it again")
            replace = True
    raise PartitionError(
        f"{part.name} changed after each of {DROP_ATTEMPTS} archives of it (rows keep arriving "
        "for its range); nothing was dropped, run prune again later"
    )


async def _check_and_drop_patiently(
    engine: AsyncEngine, part: PartitionInfo, lake: Lake | None, say: Callable[[str], None]
) -> tuple[int, list[str]] | None:
    """``_check_and_drop`` in attempts that wait ``DROP_LOCK_TIMEOUT_S`` for a lock each, so
    writers never queue long behind the detach."""
    give_up = time.monotonic() + DROP_LOCK_GIVE_UP_S
    told = False
    while True:
        try:
            async with engine.begin() as conn:
                return await _check_and_drop(conn, part, lake)
        except DBAPIError as exc:
            if "lock timeout" not in str(exc):
                raise
            if time.monotonic() > give_up:
                raise PartitionError(
                    f"{part.name}: {TABLE} stayed in use by other sessions for "
                    f"{DROP_LOCK_GIVE_UP_S:g} s; nothing was dropped, run prune again later"
                ) from None
            if not told:
                say(f"{part.name}: waiting for other sessions to let go of {TABLE}")
                told = True
            await asyncio.sleep(DROP_LOCK_TIMEOUT_S)


async def _check_and_drop(
    conn: AsyncConnection, part: PartitionInfo, lake: Lake | None
) -> tuple[int, list[str]] | None:
    """The transaction of ``_drop``: ``_Changed`` (rolled back) when the partition no longer
    matches its archive."""
    from orderbook_store.files.lake_checksum import Totals, totals_sql
    from orderbook_store.ops import archive

    assert part.start_us is not None and part.end_us is not None
    await conn.execute(text(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})"))
    # From here on, no wait for a lock outlasts DROP_LOCK_TIMEOUT_S (the caller tries again).
    await conn.execute(text(f"SET LOCAL lock_timeout = '{int(DROP_LOCK_TIMEOUT_S * 1000)}ms'"))
    still_attached = (
        await conn.execute(
            text(
                "SELECT 1 FROM pg_inherits "
                "WHERE inhrelid = to_regclass(:name) AND inhparent = to_regclass(:table)"
            ),
            {"name": f'"{part.name}"', "table": TABLE},
        )
    ).first()
    if still_attached is None:
        return None
    # No insert into it from here on; reads carry on until the detach.
    await conn.execute(text(f'LOCK TABLE "{part.name}" IN SHARE MODE'))
    files: list[str] = []
    if lake is None:
        rows = int((await conn.execute(text(f'SELECT count(*) FROM "{part.name}"'))).scalar_one())
    else:
        entry = await lake_catalog.entry_for(conn, part.start_us, part.end_us)
        if entry is None:
            raise _Changed("it has no archive")
        if entry.lake_url != lake.url:
            raise PartitionError(
                f"{part.name} is archived in the lake {entry.lake_url!r}, not in {lake.url!r}: "
                "point LAKE_URL at that lake to prune it; nothing was dropped"
            )
        now = Totals.from_row((await conn.execute(text(totals_sql(f'"{part.name}"')))).one())
        if (now.rows, now.digest()) != (entry.rows, entry.checksum):
            raise _Changed(f"it holds {now.rows:,} rows, its archive {entry.rows:,}")
        missing = archive.missing_files(lake, entry.files)
        if missing:
            raise _Changed(f"{len(missing)} of its lake files are gone")
        rows, files = now.rows, entry.files
    await conn.execute(text(f'ALTER TABLE {TABLE} DETACH PARTITION "{part.name}"'))
    await conn.execute(text(f'DROP TABLE "{part.name}"'))
    if lake is not None:
        await lake_catalog.mark_dropped(conn, part.start_us, part.end_us)
    return rows, files
