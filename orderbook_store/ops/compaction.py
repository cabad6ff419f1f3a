"""Compaction: closed partitions rewritten in (symbol, timestamp, id) order, one per period.

Rows arrive interleaved (every symbol's quotes in arrival order), so a one-symbol read of a
partition touches a block for every few rows; the same rows ordered by (symbol, timestamp, id)
sit together, and the read touches a small fraction of the blocks. ``compact(engine)``
rewrites every *closed* partition (its whole range in the past) not compacted yet, including
the historical partition revision 0004 adopts from a plain table, which it splits into one
partition per period so ``prune`` can retire its days one by one.

How one partition ``P`` is compacted while writers and readers carry on:

1. **capture**: a trigger on ``P`` copies each row inserted into it from then on into a side
   table ``<P>_late``; an ``UPDATE``, ``DELETE`` or ``TRUNCATE`` of ``P`` is refused until the
   end (the store only ever inserts, so nothing of ours is refused);
2. **build**: for each period of ``P``'s range, a table ``<name>_sorted`` is filled from ``P``
   in (symbol, timestamp, id) order with every value and id as stored, gets the parent's
   primary key and indexes and a validated ``CHECK`` of its range (so attaching it needs no
   scan), all in one transaction; then ``VACUUM (FREEZE, ANALYZE)``;
3. **catch up**: rows captured meanwhile move into the new tables (the primary key skips those
   the copy already had); then the run waits for transactions whose snapshot is older than
   that, which could not see the new tables' rows;
4. **swap**: one short transaction takes the table's lock (``lock_timeout``, retried) and, if
   no row arrived since step 3 (else back to 3), detaches and drops ``P`` and attaches the new
   tables under their final names, each with a comment recording the compaction.

Writers wait only for the swap (milliseconds: no row is copied and no index built under the
lock); a statement sees either ``P`` or the new tables, never both or neither. As with any
rewrite (``CLUSTER``, ``VACUUM FULL``), a ``REPEATABLE READ`` transaction that took its
snapshot before step 3 and first reads the table after the swap would miss the rows; step 3's
wait is what rules that out. Each run compacts partitions one at a time and holds a session
advisory lock, so runs take turns; the structural steps hold ``ensure``'s and ``prune``'s
transaction lock too. Idempotent (a compacted partition is skipped; nothing to do takes no
lock) and resumable: a killed run leaves whole steps behind (each is one transaction), which
the next run finds by the JSON comment on each table it made, reuses, and completes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.models import TABLE_COLUMNS
from orderbook_store.ops import partitions as parts
from orderbook_store.ops.partitions import (
    ADVISORY_LOCK_KEY,
    DEFAULT_PARTITION,
    TABLE,
    PartitionError,
    PartitionInfo,
    Period,
)
from orderbook_store.pg.connection import raw_connection
from orderbook_store.times import day_of, day_start_us, from_us

__all__ = ["CompactResult", "CompactedPartition", "compact", "compactable"]

#: Key of the session advisory lock a compaction run holds from start to end.
SESSION_LOCK_KEY = 0x0B5_9A28

#: The JSON key of the comment on every table a compaction makes (how a later run finds them).
STATE_KEY = "orderbook_compaction"
CAPTURE = "orderbook_compaction_capture"  # trigger and function: late rows -> side table
GUARD = "orderbook_compaction_guard"  # trigger and function: no UPDATE/DELETE/TRUNCATE
GUARD_TRUNCATE = "orderbook_compaction_guard_truncate"
DEFAULT_EXCLUSION = "orderbook_compaction_elsewhere"

#: Waits between attempts to take the table's lock for a swap (seconds); then it gives up.
LOCK_RETRY_DELAYS_S = (0.5, 1, 1, 2, 2, 4, 4, 8, 8, 15, 15, 30, 30, 30, 30, 30, 30)
#: Swaps put off because rows arrived just before the lock; the next one moves them itself.
LATE_RETRIES = 2

ProgressFn = Callable[[str], None]
_COLUMNS = ", ".join(f'"{c}"' for c in TABLE_COLUMNS)
_INDEX_DEF = re.compile(r"^CREATE (UNIQUE )?INDEX \S+ ON ONLY \S+ (USING .+)$")


@dataclass
class CompactedPartition:
    """One closed partition compacted: what replaced it, rows, and what the swap cost."""

    source: str
    partitions: list[str]
    rows: int
    late_rows: int
    lock_s: float
    seconds: float


@dataclass
class CompactResult:
    """What ``compact`` did. ``already_compacted`` counts closed partitions it left alone."""

    period: Period
    compacted: list[CompactedPartition] = field(default_factory=list)
    already_compacted: int = 0

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.compacted)

    @property
    def longest_lock_s(self) -> float:
        return max((c.lock_s for c in self.compacted), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, plus the totals."""
        return asdict(self) | {"rows": self.rows, "longest_lock_s": self.longest_lock_s}


@dataclass(frozen=True)
class _Piece:
    """One period of a source partition: the table that will hold it and its final name."""

    start_us: int
    end_us: int
    name: str

    @property
    def staging(self) -> str:
        return f"{self.name}_sorted"


class _Busy(Exception):
    """A lock was not granted in time; nothing changed."""


class _JustArrived(Exception):
    """Rows arrived between the catch-up and the swap's lock; nothing changed."""


class _Gone(Exception):
    """The source partition is no longer attached as it was (pruned meanwhile)."""


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _us(moment: dt.datetime) -> int:
    return (moment - from_us(0)) // dt.timedelta(microseconds=1)


def _now_us() -> int:
    return _us(dt.datetime.now(dt.timezone.utc))


# -- what to compact --------------------------------------------------------------------------


def _closed(found: Sequence[PartitionInfo], now_us: int) -> list[PartitionInfo]:
    return [p for p in found if p.end_us is not None and p.end_us <= now_us]


async def compactable(
    engine: AsyncEngine, *, now: dt.datetime | None = None
) -> list[PartitionInfo]:
    """Closed partitions not compacted yet (what ``compact`` would rewrite), oldest first."""
    now_us = _now_us() if now is None else _us(now)
    found = await parts.list_partitions(engine)
    return [p for p in _closed(found, now_us) if p.compacted_at is None]


def _pieces(part: PartitionInfo, period: Period, taken: set[str]) -> list[_Piece]:
    """``part``'s range cut at the boundaries of ``period``; names as ``ensure`` gives them."""
    assert part.start_us is not None and part.end_us is not None
    pieces: list[_Piece] = []
    start = parts.period_start(day_of(part.start_us), period)
    names = set(taken) - {part.name}
    while day_start_us(start) < part.end_us:
        following = parts.next_period(start, period)
        lo = max(day_start_us(start), part.start_us)
        hi = min(day_start_us(following), part.end_us)
        name = parts.partition_name(lo, hi, names)
        names.add(name)
        pieces.append(_Piece(lo, hi, name))
        start = following
    return pieces


# -- the run ----------------------------------------------------------------------------------


async def compact(
    engine: AsyncEngine,
    *,
    period: Period | str | None = None,
    now: dt.datetime | None = None,
    lock_timeout_s: float = 0.2,
    snapshot_wait_s: float = 300.0,
    progress: ProgressFn | None = None,
) -> CompactResult:
    """Rewrite every closed, not yet compacted partition in (symbol, timestamp, id) order.

    Each becomes one partition per ``period`` (default: the period the table uses), so the
    historical partition of an adopted table is split into days. Ids and values are kept
    exactly; rows written meanwhile are kept. ``lock_timeout_s`` bounds each attempt to take
    the table's lock for a swap (writers queue behind a waiting attempt, so keep it short);
    attempts are retried for a few minutes before ``PartitionError``. ``snapshot_wait_s``
    bounds the wait for older transactions before a swap. ``now`` (aware UTC) is for tests;
    ``progress`` gets one line per step. Costs one sorted copy of each partition (disk for it
    until the swap) and ``VACUUM`` of the copy. Holds one connection as its own session for the
    whole run (a session lock): not through PgBouncer's transaction pooling.
    """
    say = progress or (lambda _line: None)
    now_us = _now_us() if now is None else _us(now)
    async with engine.connect() as sa_conn:
        try:
            conn = await raw_connection(sa_conn)
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1::bigint)", SESSION_LOCK_KEY):
                say("another compaction is running: waiting for it to finish")
                await conn.execute(f"SELECT pg_advisory_lock({SESSION_LOCK_KEY})")
            await _session_settings(conn)
            return await _run(conn, period, now_us, lock_timeout_s, snapshot_wait_s, say)
        finally:
            # Closed, not pooled: that ends the session lock and settings however the run ended.
            await sa_conn.invalidate()


async def _session_settings(conn: asyncpg.Connection) -> None:
    # Copies and VACUUM take as long as they take; a killed run's server process stops within
    # a second instead of finishing a copy nobody waits for (PostgreSQL 14+).
    await conn.execute("SET statement_timeout = 0")
    if int(await conn.fetchval("SHOW server_version_num")) >= 140000:
        await conn.execute("SET client_connection_check_interval = '1s'")


async def _run(
    conn: asyncpg.Connection,
    period: Period | str | None,
    now_us: int,
    lock_timeout_s: float,
    snapshot_wait_s: float,
    say: ProgressFn,
) -> CompactResult:
    kind = await conn.fetchval(
        f"SELECT relkind::text FROM pg_class WHERE oid = to_regclass('{TABLE}')"
    )
    if kind != "p":
        raise PartitionError(parts.NOT_PARTITIONED)
    found = sorted(
        (parts.partition_of(*row) for row in await conn.fetch(parts.partitions_sql(sizes=False))),
        key=lambda p: (p.start_us is None, p.start_us or 0),
    )
    chosen = parts.check_period(period) if period is not None else parts.infer_period(found)
    result = CompactResult(period=chosen)
    closed = _closed(found, now_us)
    todo = [p for p in closed if p.compacted_at is None]
    result.already_compacted = len(closed) - len(todo)
    state = await _leftovers(conn)
    await _clean_leftovers(conn, state, {p.name for p in todo}, lock_timeout_s, say)
    taken = {str(r[0]) for r in await conn.fetch(_RELATIONS_SQL)}
    todo.sort(key=lambda p: (p.name not in state["sources"], p.start_us or 0))
    for part in todo:
        pieces = _pieces(part, chosen, taken)
        taken.update(piece.name for piece in pieces)
        done = await _compact_one(conn, part, pieces, state, lock_timeout_s, snapshot_wait_s, say)
        if done is not None:
            result.compacted.append(done)
    await _drop_functions_if_unused(conn)
    return result


_RELATIONS_SQL = "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace"


async def _compact_one(
    conn: asyncpg.Connection,
    part: PartitionInfo,
    pieces: list[_Piece],
    state: dict[str, Any],
    lock_timeout_s: float,
    snapshot_wait_s: float,
    say: ProgressFn,
) -> CompactedPartition | None:
    started = time.perf_counter()
    late = state["sources"].get(part.name, f"{part.name}_late")
    built: dict[str, dict[str, Any]] = state["staging"].get(part.name, {})
    for name in (late, *(p.staging + "_range" for p in pieces)):
        if len(name.encode()) > 63:
            raise PartitionError(f"partition name {part.name!r} is too long to compact")
    if part.name in state["sources"]:
        say(f"resuming {part.name} ({len(built)} of {len(pieces)} sorted copies built)")
    else:
        into = "in place" if len(pieces) == 1 else f"into {len(pieces)} partitions"
        say(f"compacting {part.name} ({_range_text(part)}) {into}")
        try:
            await _with_retries(
                lambda: _start_capture(conn, part, late, lock_timeout_s), lock_timeout_s, say
            )
        except _Gone:
            say(f"skipped {part.name}: no longer attached")
            return None
    for piece in pieces:
        meta = built.get(piece.staging)
        if meta is not None and (meta["start_us"], meta["end_us"], meta["name"]) == (
            piece.start_us,
            piece.end_us,
            piece.name,
        ):
            continue
        if meta is not None:  # made for another period: not ours to reuse
            await conn.execute(f"DROP TABLE {_q(piece.staging)}")
        building = time.perf_counter()
        rows = await _build(conn, part, piece, multi=len(pieces) > 1)
        say(f"built {piece.staging} ({rows:,} rows) in {time.perf_counter() - building:.1f} s")
    for piece in pieces:
        await conn.execute(f"VACUUM (FREEZE, ANALYZE) {_q(piece.staging)}")
    late_rows = busy = just_arrived = 0
    while True:
        moved, xid = await _catch_up(conn, late, pieces)
        late_rows += moved
        await _wait_for_older_snapshots(conn, xid, snapshot_wait_s, say)
        try:
            rows, lock_s, moved = await _swap(
                conn, part, pieces, late, lock_timeout_s, take_late=just_arrived >= LATE_RETRIES
            )
        except _JustArrived:
            just_arrived += 1
            continue
        except _Busy as reason:
            if busy == len(LOCK_RETRY_DELAYS_S):
                raise PartitionError(
                    f"{TABLE} stayed locked by other sessions at every attempt to swap "
                    f"{part.name}; its sorted copies are kept: run compact again later to finish"
                ) from None
            say(f"swap of {part.name} postponed ({reason}); trying again")
            await asyncio.sleep(LOCK_RETRY_DELAYS_S[busy])
            busy += 1
            continue
        except _Gone:
            await _abandon(conn, part.name, [p.staging for p in pieces], late, lock_timeout_s)
            say(f"skipped {part.name}: it was detached meanwhile; its sorted copies are dropped")
            return None
        late_rows += moved
        names = [p.name for p in pieces]
        shown = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        say(
            f"swapped {part.name} for {shown}: {rows:,} rows "
            f"({late_rows:,} arrived meanwhile), table locked {lock_s * 1000:.0f} ms"
        )
        return CompactedPartition(
            part.name, names, rows, late_rows, lock_s, time.perf_counter() - started
        )


def _range_text(part: PartitionInfo) -> str:
    assert part.start is not None and part.end is not None
    return f"{part.start:%Y-%m-%d} .. {part.end:%Y-%m-%d}"


async def _with_retries(
    step: Callable[[], Awaitable[None]], lock_timeout_s: float, say: ProgressFn
) -> None:
    """Run ``step`` (a short locking transaction), again after a pause when a lock times out."""
    for attempt, delay in enumerate((0.0, *LOCK_RETRY_DELAYS_S)):
        await asyncio.sleep(delay)
        try:
            await step()
            return
        except asyncpg.LockNotAvailableError:
            if attempt == len(LOCK_RETRY_DELAYS_S):
                break
            say(f"a lock was not granted within {lock_timeout_s:g} s; trying again")
    raise PartitionError(
        f"{TABLE} stayed locked by other sessions; nothing was changed, run compact again later"
    )


# -- steps (each one transaction, so a kill leaves it done or not done) ----------------------


async def _attached_bound(conn: asyncpg.Connection, name: str) -> tuple[int, int] | None:
    bound = await conn.fetchval(
        "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid "
        f"WHERE i.inhparent = '{TABLE}'::regclass AND c.relname = $1 "
        "AND c.relnamespace = current_schema()::regnamespace",
        name,
    )
    info = parts.partition_of(name, bound, 0, 0, None)
    if info.start_us is None or info.end_us is None:
        return None
    return info.start_us, info.end_us


def _capture_functions() -> str:
    values = ", ".join(f"($1).{_q(c)}" for c in TABLE_COLUMNS)
    return f"""
CREATE OR REPLACE FUNCTION {CAPTURE}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    EXECUTE format('INSERT INTO %I.%I ({_COLUMNS}) VALUES ({values})',
                   TG_TABLE_SCHEMA, TG_ARGV[0]) USING NEW;
    RETURN NULL;
END
$fn$;
CREATE OR REPLACE FUNCTION {GUARD}() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RAISE EXCEPTION '% is being compacted: its rows cannot be updated, deleted or truncated '
        'until orderbook-store partitions compact finishes', TG_TABLE_NAME
        USING ERRCODE = 'object_in_use';
END
$fn$;
"""


async def _start_capture(
    conn: asyncpg.Connection, part: PartitionInfo, late: str, lock_timeout_s: float
) -> None:
    """Step 1: the side table and the triggers, in one transaction (waits for writers in
    ``part`` to finish, then every later insert into it is captured)."""
    state = json.dumps({STATE_KEY: {"source": part.name, "role": "late"}})
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
        await conn.execute(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})")
        if await _attached_bound(conn, part.name) != (part.start_us, part.end_us):
            raise _Gone
        table = _q(part.name)
        await conn.execute(
            _capture_functions()
            + f"""
CREATE TABLE {_q(late)} (LIKE {TABLE});
COMMENT ON TABLE {_q(late)} IS {_literal(state)};
CREATE TRIGGER {CAPTURE} AFTER INSERT ON {table}
    FOR EACH ROW EXECUTE FUNCTION {CAPTURE}({_literal(late)});
CREATE TRIGGER {GUARD} BEFORE UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {GUARD}();
CREATE TRIGGER {GUARD_TRUNCATE} BEFORE TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {GUARD}();
"""
        )


async def _parent_indexes(conn: asyncpg.Connection) -> tuple[str, list[str]]:
    """The parent's primary key definition and its other indexes' ``USING ...`` clauses."""
    key = await conn.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        f"WHERE conrelid = '{TABLE}'::regclass AND contype = 'p'"
    )
    definitions = await conn.fetch(
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index "
        f"WHERE indrelid = '{TABLE}'::regclass AND NOT indisprimary ORDER BY indexrelid"
    )
    clauses = []
    for (definition,) in definitions:
        match = _INDEX_DEF.match(definition)
        if match is None:
            raise PartitionError(f"cannot mirror index of {TABLE} on a new partition: {definition}")
        clauses.append(f"{match.group(1) or ''}INDEX ON {{table}} {match.group(2)}")
    return str(key), clauses


_SYMBOLS = """ARRAY(
    WITH RECURSIVE symbols(symbol) AS (
        (SELECT symbol FROM {source} ORDER BY symbol LIMIT 1)
        UNION ALL
        SELECT (SELECT s.symbol FROM {source} s WHERE s.symbol > symbols.symbol
                ORDER BY s.symbol LIMIT 1)
        FROM symbols WHERE symbols.symbol IS NOT NULL
    )
    SELECT symbol FROM symbols WHERE symbol IS NOT NULL)"""


async def _build(
    conn: asyncpg.Connection, part: PartitionInfo, piece: _Piece, *, multi: bool
) -> int:
    """Step 2 for one piece: the sorted copy with its indexes and range check, one transaction.

    From a partition spanning many periods, each period's rows are found through the
    (symbol, timestamp) index, symbol by symbol, instead of scanning the whole partition once
    per period.
    """
    table = _q(piece.staging)
    in_range = f'"timestamp" >= {piece.start_us} AND "timestamp" < {piece.end_us}'
    where = in_range
    if multi:
        where = f"symbol = ANY ({_SYMBOLS.format(source=_q(part.name))}) AND {in_range}"
    key, indexes = await _parent_indexes(conn)
    async with conn.transaction():
        await conn.execute(f"CREATE TABLE {table} (LIKE {TABLE} INCLUDING DEFAULTS)")
        status = await conn.execute(
            f"INSERT INTO {table} ({_COLUMNS}) SELECT {_COLUMNS} FROM {_q(part.name)} "
            f'WHERE {where} ORDER BY symbol, "timestamp", id'
        )
        rows = int(status.split()[-1])
        await conn.execute(
            f"ALTER TABLE {table} ADD CONSTRAINT {_q(piece.staging + '_range')} "
            f"CHECK ({in_range});"
            f"ALTER TABLE {table} ADD CONSTRAINT {_q(piece.staging + '_pkey')} {key};"
            + "".join(f"CREATE {index.format(table=table)};" for index in indexes)
        )
        await _set_state(conn, part.name, piece, rows)
    return rows


async def _set_state(conn: asyncpg.Connection, source: str, piece: _Piece, rows: int) -> None:
    state = {
        STATE_KEY: {
            "source": source,
            "role": "sorted",
            "start_us": piece.start_us,
            "end_us": piece.end_us,
            "name": piece.name,
            "rows": rows,
        }
    }
    await conn.execute(f"COMMENT ON TABLE {_q(piece.staging)} IS {_literal(json.dumps(state))}")


async def _catch_up(conn: asyncpg.Connection, late: str, pieces: list[_Piece]) -> tuple[int, str]:
    """Step 3: captured rows into the sorted copies, in a transaction of its own; returns the
    rows added and the transaction's id (snapshots older than it cannot see them)."""
    async with conn.transaction():
        added = await _move_late(conn, late, pieces)
        xid = await conn.fetchval("SELECT pg_current_xact_id()::xid::text")
    return added, str(xid)


async def _move_late(conn: asyncpg.Connection, late: str, pieces: list[_Piece]) -> int:
    """Captured rows (committed ones) out of the side table into the sorted copies; those the
    copy already had are skipped (by the primary key). Returns the rows added."""
    added = 0
    if not await conn.fetchval(f"SELECT EXISTS (SELECT FROM {_q(late)})"):
        return 0
    for piece in pieces:
        status = await conn.execute(
            f'WITH moved AS (DELETE FROM {_q(late)} WHERE "timestamp" >= {piece.start_us} '
            f'AND "timestamp" < {piece.end_us} RETURNING {_COLUMNS}) '
            f"INSERT INTO {_q(piece.staging)} ({_COLUMNS}) SELECT {_COLUMNS} FROM moved "
            'ORDER BY symbol, "timestamp", id ON CONFLICT DO NOTHING'
        )
        moved = int(status.split()[-1])
        if moved:
            note = await conn.fetchval(
                "SELECT obj_description(to_regclass($1), 'pg_class')", _q(piece.staging)
            )
            rows = int(json.loads(note)[STATE_KEY]["rows"]) + moved
            await _set_state(conn, _source_of(note), piece, rows)
            added += moved
    return added


def _source_of(note: str) -> str:
    return str(json.loads(note)[STATE_KEY]["source"])


async def _wait_for_older_snapshots(
    conn: asyncpg.Connection, xid: str, timeout_s: float, say: ProgressFn
) -> None:
    """Wait until every transaction whose snapshot may predate transaction ``xid`` has ended
    (as ``CREATE INDEX CONCURRENTLY`` does): after the swap it would read the new tables
    without seeing their rows."""
    # Another role's sessions show their xmin but not their backend type or transaction start:
    # the transaction is told apart by its virtual transaction id (pg_locks shows them all).
    older = """
        SELECT a.pid, coalesce(l.virtualxid, a.xact_start::text) AS xact
        FROM pg_stat_activity a
        LEFT JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'virtualxid' AND l.granted
        WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
          AND a.usesysid IS NOT NULL AND coalesce(a.backend_type, 'client backend') <> 'walsender'
          AND a.backend_xmin IS NOT NULL AND age(a.backend_xmin) >= age($1::text::xid)
    """
    waiting = {(r["pid"], r["xact"]) for r in await conn.fetch(older, xid)}
    deadline = time.monotonic() + timeout_s
    said = False
    while waiting:
        current = {(r["pid"], r["xact"]) for r in await conn.fetch(older, xid)}
        waiting &= current
        if not waiting:
            return
        if not said:
            pids = ", ".join(str(pid) for pid, _ in sorted(waiting))
            say(f"waiting for transactions with older snapshots to end (pid {pids})")
            said = True
        if time.monotonic() > deadline:
            pids = ", ".join(str(pid) for pid, _ in sorted(waiting))
            raise PartitionError(
                f"transactions of pid {pids} kept a snapshot older than the sorted copies for "
                f"{timeout_s:g} s; the copies are kept: run compact again when they have ended"
            )
        await asyncio.sleep(0.05)


async def _swap(
    conn: asyncpg.Connection,
    part: PartitionInfo,
    pieces: list[_Piece],
    late: str,
    lock_timeout_s: float,
    *,
    take_late: bool,
) -> tuple[int, float, int]:
    """Step 4: under the table's lock, ``part`` out and the sorted copies in; returns the rows
    they hold, how long the lock was held (from granted to the commit, whose deletion of the
    old files comes after the locks are released), and the rows it moved from the side table.

    Rows captured since the catch-up are moved here only with ``take_late``: otherwise the
    swap is called off (``_JustArrived``), since a snapshot taken just before this commit would
    not see rows this transaction writes."""
    moved = 0
    now = dt.datetime.now(dt.timezone.utc)
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
            await conn.execute(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})")
            # The parent first, as every insert and query takes it: no deadlock with them.
            await conn.execute(f"LOCK TABLE ONLY {TABLE} IN ACCESS EXCLUSIVE MODE")
            locked = time.perf_counter()
            if await _attached_bound(conn, part.name) != (part.start_us, part.end_us):
                raise _Gone
            await conn.execute(f"LOCK TABLE {_q(part.name)} IN ACCESS EXCLUSIVE MODE")
            if take_late:
                moved = await _move_late(conn, late, pieces)
            elif await conn.fetchval(f"SELECT EXISTS (SELECT FROM {_q(late)})"):
                raise _JustArrived
            notes = await conn.fetch(
                "SELECT obj_description(to_regclass(s), 'pg_class') FROM unnest($1::text[]) s",
                [_q(p.staging) for p in pieces],
            )
            rows = sum(int(json.loads(n[0])[STATE_KEY]["rows"]) for n in notes)
            await conn.execute(await _swap_script(conn, part, pieces, late, now, notes))
            # The commit follows: it releases the locks first, then deletes the old files.
            done = time.perf_counter()
    except asyncpg.LockNotAvailableError:
        raise _Busy(f"a lock was not granted within {lock_timeout_s:g} s") from None
    return rows, done - locked, moved


async def _swap_script(
    conn: asyncpg.Connection,
    part: PartitionInfo,
    pieces: list[_Piece],
    late: str,
    now: dt.datetime,
    notes: Sequence[asyncpg.Record],
) -> str:
    default = _q(DEFAULT_PARTITION)
    script = [
        f"ALTER TABLE {TABLE} DETACH PARTITION {_q(part.name)}",
        f"DROP TABLE {_q(part.name)}",
        f"DROP TABLE {_q(late)}",
    ]
    # Each ATTACH proves from the default partition's rows that none is in its range: with
    # rows there, one validated CHECK spares each piece that scan.
    spare_scans = len(pieces) > 1 and await conn.fetchval(
        f"SELECT to_regclass('{DEFAULT_PARTITION}') IS NOT NULL AND EXISTS (SELECT FROM {default})"
    )
    if spare_scans:
        script.append(
            f"ALTER TABLE {default} ADD CONSTRAINT {DEFAULT_EXCLUSION} "
            f'CHECK ("timestamp" < {part.start_us} OR "timestamp" >= {part.end_us})'
        )
    for piece, note in zip(pieces, notes, strict=True):
        rows = int(json.loads(note[0])[STATE_KEY]["rows"])
        script += [
            f"ALTER TABLE {TABLE} ATTACH PARTITION {_q(piece.staging)} "
            f"FOR VALUES FROM ({piece.start_us}) TO ({piece.end_us})",
            f"ALTER TABLE {_q(piece.staging)} RENAME TO {_q(piece.name)}",
            f"ALTER TABLE {_q(piece.name)} RENAME CONSTRAINT {_q(piece.staging + '_pkey')} "
            f"TO {_q(piece.name + '_pkey')}",
            f"ALTER TABLE {_q(piece.name)} DROP CONSTRAINT {_q(piece.staging + '_range')}",
            f"COMMENT ON TABLE {_q(piece.name)} IS {_literal(parts.compacted_note(now, rows))}",
        ]
    if spare_scans:
        script.append(f"ALTER TABLE {default} DROP CONSTRAINT {DEFAULT_EXCLUSION}")
    names = ", ".join(_literal(p.name) for p in pieces)
    script.append(_TIDY_INDEXES.replace("{names}", names))
    return ";\n".join(script) + ";"


#: Names the new partitions' indexes as every partition's are: ``<parent index>_<suffix>``.
_TIDY_INDEXES = """
DO $tidy$
DECLARE r record;
BEGIN
    FOR r IN
        SELECT child.relname AS child,
               left(parent.relname || '_' || regexp_replace(t.relname, '^orderbook_data_', ''), 63)
                   AS wanted
        FROM pg_index x
        JOIN pg_class child ON child.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_inherits h ON h.inhrelid = child.oid
        JOIN pg_class parent ON parent.oid = h.inhparent
        WHERE t.relname IN ({names}) AND NOT x.indisprimary
          AND t.relnamespace = current_schema()::regnamespace
    LOOP
        IF r.child <> r.wanted THEN
            EXECUTE format('ALTER INDEX %I RENAME TO %I', r.child, r.wanted);
        END IF;
    END LOOP;
END
$tidy$"""


# -- what an interrupted run left -------------------------------------------------------------


async def _leftovers(conn: asyncpg.Connection) -> dict[str, Any]:
    """Tables made by earlier runs (by their comments) and the partitions still captured:
    ``{"sources": {partition: side table}, "staging": {partition: {table: state}},
    "captured": {partition with the capture trigger}}``."""
    rows = await conn.fetch(
        "SELECT c.relname, obj_description(c.oid, 'pg_class') AS note FROM pg_class c "
        "WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r' "
        "AND obj_description(c.oid, 'pg_class') LIKE $1",
        f'{{"{STATE_KEY}":%',
    )
    captured = {
        str(r[0])
        for r in await conn.fetch(
            "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE t.tgname = $1 AND c.relnamespace = current_schema()::regnamespace",
            CAPTURE,
        )
    }
    sources: dict[str, str] = {}
    staging: dict[str, dict[str, dict[str, Any]]] = {}
    for name, note in rows:
        state = json.loads(note)[STATE_KEY]
        if state["role"] == "late":
            sources[state["source"]] = name
        else:
            staging.setdefault(state["source"], {})[name] = state
    return {"sources": sources, "staging": staging, "captured": captured}


async def _clean_leftovers(
    conn: asyncpg.Connection,
    state: dict[str, Any],
    todo: set[str],
    lock_timeout_s: float,
    say: ProgressFn,
) -> None:
    """Drop what cannot be resumed: copies of partitions no longer to compact (pruned, say) or
    no longer captured, and triggers without their side table."""
    sources, staging, captured = state["sources"], state["staging"], state["captured"]
    resumable = {s for s in sources if s in todo and s in captured}
    for source in (set(sources) | set(staging) | captured) - resumable:
        late = sources.pop(source, None)
        tables = list(staging.pop(source, {}))
        await _abandon(conn, source, tables, late, lock_timeout_s)
        say(f"dropped what an interrupted compaction of {source} left")


async def _abandon(
    conn: asyncpg.Connection,
    source: str,
    tables: list[str],
    late: str | None,
    lock_timeout_s: float,
) -> None:
    async def drop() -> None:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
            await conn.execute(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})")
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", _q(source)):
                for trigger in (CAPTURE, GUARD, GUARD_TRUNCATE):
                    await conn.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {_q(source)}")
            for table in [*tables, *([late] if late else [])]:
                await conn.execute(f"DROP TABLE IF EXISTS {_q(table)}")

    await _with_retries(drop, lock_timeout_s, lambda _line: None)


async def _drop_functions_if_unused(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})")
        in_use = await conn.fetchval(
            "SELECT EXISTS (SELECT FROM pg_trigger WHERE tgname = ANY ($1::text[]))",
            [CAPTURE, GUARD, GUARD_TRUNCATE],
        )
        if not in_use:
            await conn.execute(
                f"DROP FUNCTION IF EXISTS {CAPTURE}(); DROP FUNCTION IF EXISTS {GUARD}()"
            )
