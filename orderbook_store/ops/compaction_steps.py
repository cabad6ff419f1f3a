"""The steps of a compaction (see ``compaction``), each one transaction or one statement, so a
kill leaves each done or not done; and what an interrupted run left, found again.

The state lives in the database only: the JSON comment on every table a compaction makes
(``{"orderbook_compaction": {"source": ..., "role": "late" | "sorted", ...}}``) and the
capture trigger on the partition being compacted.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from orderbook_store.models import TABLE_COLUMNS
from orderbook_store.ops import partitions as parts
from orderbook_store.ops.partitions import (
    ADVISORY_LOCK_KEY,
    DEFAULT_PARTITION,
    TABLE,
    PartitionError,
    PartitionInfo,
)

ProgressFn = Callable[[str], None]

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
#: ``work_mem`` of the sorted copy's transaction.
SORT_MEMORY = "64MB"


_COLUMNS = ", ".join(f'"{c}"' for c in TABLE_COLUMNS)
_INDEX_DEF = re.compile(r"^CREATE (UNIQUE )?INDEX \S+ ON ONLY \S+ (USING .+)$")


@dataclass(frozen=True)
class Piece:
    """One period of a source partition: the table that will hold it and its final name."""

    start_us: int
    end_us: int
    name: str

    @property
    def staging(self) -> str:
        return f"{self.name}_sorted"


class Busy(Exception):
    """A lock was not granted in time; nothing changed."""


class JustArrived(Exception):
    """Rows arrived between the catch-up and the swap's lock; nothing changed."""


class Gone(Exception):
    """The source partition is no longer attached as it was (pruned meanwhile)."""


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def with_retries(
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


async def drop_table(conn: asyncpg.Connection, name: str) -> None:
    await conn.execute(f"DROP TABLE IF EXISTS {_q(name)}")


async def vacuum(conn: asyncpg.Connection, name: str) -> None:
    """``VACUUM (FREEZE, ANALYZE)`` of a sorted copy: planner statistics before it serves reads,
    and its rows frozen once, as old rows never change (cheap again on a resumed run)."""
    await conn.execute(f"VACUUM (FREEZE, ANALYZE) {_q(name)}")


# -- steps (each one transaction, so a kill leaves it done or not done) ----------------------


async def attached_bound(conn: asyncpg.Connection, name: str) -> tuple[int, int] | None:
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
    -- An abandoned compaction's side table may be gone before its trigger: never refuse a row.
    IF to_regclass(format('%I.%I', TG_TABLE_SCHEMA, TG_ARGV[0])) IS NOT NULL THEN
        EXECUTE format('INSERT INTO %I.%I ({_COLUMNS}) VALUES ({values})',
                       TG_TABLE_SCHEMA, TG_ARGV[0]) USING NEW;
    END IF;
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


async def start_capture(
    conn: asyncpg.Connection, part: PartitionInfo, late: str, lock_timeout_s: float
) -> None:
    """Step 1: the side table and the triggers, in one transaction (waits for writers in
    ``part`` to finish, then every later insert into it is captured)."""
    state = json.dumps({STATE_KEY: {"source": part.name, "role": "late"}})
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
        await conn.execute(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})")
        if await attached_bound(conn, part.name) != (part.start_us, part.end_us):
            raise Gone
        table = _q(part.name)
        await _drop_triggers(conn, part.name)  # of an attempt abandoned while it was busy
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


#: The timestamps that start each symbol's run of rows in a period: per symbol, the first row at
#: or after each boundary that follows the last one found (one index descent per period that
#: holds the symbol, plus one). ``$1``: every period boundary of the source's range, its end too.
_FIRST_OF_EACH_PERIOD = """
WITH RECURSIVE walk(symbol, ts) AS (
    SELECT s.symbol, (SELECT min(h."timestamp") FROM {source} h WHERE h.symbol = s.symbol)
    FROM unnest({symbols}) AS s(symbol)
    UNION ALL
    SELECT w.symbol,
           (SELECT min(h."timestamp") FROM {source} h
            WHERE h.symbol = w.symbol
              AND h."timestamp" >= (SELECT min(b) FROM unnest($1::bigint[]) b WHERE b > w.ts))
    FROM walk w WHERE w.ts IS NOT NULL
)
SELECT DISTINCT ts FROM walk WHERE ts IS NOT NULL"""


async def periods_holding_rows(
    conn: asyncpg.Connection, part: PartitionInfo, boundaries: Sequence[int]
) -> set[int]:
    """The starts (of ``boundaries``) of the periods where ``part`` has rows, through its
    (symbol, timestamp) index: a partition adopted from a plain table can span years with rows
    in a few of its days, and only those become partitions. Run after the capture started, so
    a row inserted later is captured (see ``swap`` for rows of a period found empty here)."""
    source = _q(part.name)
    sql = _FIRST_OF_EACH_PERIOD.format(source=source, symbols=_SYMBOLS.format(source=source))
    try:
        found = await conn.fetch(sql, list(boundaries))
    except asyncpg.UndefinedTableError:  # dropped since (pruned)
        raise Gone from None
    starts = sorted(boundaries)
    return {starts[bisect.bisect_right(starts, ts) - 1] for (ts,) in found}


async def build(conn: asyncpg.Connection, part: PartitionInfo, piece: Piece, *, multi: bool) -> int:
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
        # The sort of a day's rows: in memory up to here, on disk beyond (a small server's
        # default of 4MB spills a few tens of thousands of rows already).
        await conn.execute(f"SET LOCAL work_mem = '{SORT_MEMORY}'")
        if await attached_bound(conn, part.name) != (part.start_us, part.end_us):
            raise Gone
        await conn.execute(f"CREATE TABLE {table} (LIKE {TABLE} INCLUDING DEFAULTS)")
        try:
            status = await conn.execute(
                f"INSERT INTO {table} ({_COLUMNS}) SELECT {_COLUMNS} FROM {_q(part.name)} "
                f'WHERE {where} ORDER BY symbol, "timestamp", id'
            )
        except asyncpg.UndefinedTableError:  # dropped since (pruned)
            raise Gone from None
        rows = int(status.split()[-1])
        await conn.execute(
            f"ALTER TABLE {table} ADD CONSTRAINT {_q(piece.staging + '_range')} "
            f"CHECK ({in_range});"
            f"ALTER TABLE {table} ADD CONSTRAINT {_q(piece.staging + '_pkey')} {key};"
            + "".join(f"CREATE {index.format(table=table)};" for index in indexes)
        )
        await _set_state(conn, part.name, piece, rows)
    return rows


async def _set_state(conn: asyncpg.Connection, source: str, piece: Piece, rows: int) -> None:
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


async def catch_up(conn: asyncpg.Connection, late: str, pieces: list[Piece]) -> tuple[int, str]:
    """Step 3: captured rows into the sorted copies, in a transaction of its own; returns the
    rows added and the transaction's id (snapshots older than it cannot see them)."""
    async with conn.transaction():
        added = await _move_late(conn, late, pieces)
        xid = await conn.fetchval("SELECT pg_current_xact_id()::xid::text")
    return added, str(xid)


async def _move_late(conn: asyncpg.Connection, late: str, pieces: list[Piece]) -> int:
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


async def wait_for_older_snapshots(
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


async def swap(
    conn: asyncpg.Connection,
    part: PartitionInfo,
    pieces: list[Piece],
    late: str,
    lock_timeout_s: float,
    *,
    take_late: bool,
    closed_before_us: int,
) -> tuple[int, float, int]:
    """Step 4: under the table's lock, ``part`` out and the sorted copies in; returns the rows
    they hold, how long the lock was held (from granted to the commit, whose deletion of the
    old files comes after the locks are released), and the rows it moved from the side table.

    Rows captured since the catch-up are moved here only with ``take_late``: otherwise the
    swap is called off (``JustArrived``), since a snapshot taken just before this commit would
    not see rows this transaction writes. A captured row of a period no piece covers (one that
    held no row when the pieces were chosen) goes, once ``part`` is out, to the partition
    that takes its time, the default one. Pieces ending after ``now`` are not closed yet: they
    become plain partitions, compacted once their period is over."""
    moved = 0
    now = dt.datetime.now(dt.timezone.utc)
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
            await conn.execute(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})")
            # The parent first, as every insert and query takes it: no deadlock with them.
            await conn.execute(f"LOCK TABLE ONLY {TABLE} IN ACCESS EXCLUSIVE MODE")
            locked = time.perf_counter()
            if await attached_bound(conn, part.name) != (part.start_us, part.end_us):
                raise Gone
            await conn.execute(f"LOCK TABLE {_q(part.name)} IN ACCESS EXCLUSIVE MODE")
            if take_late:
                moved = await _move_late(conn, late, pieces)
                moved += int(await conn.fetchval(f"SELECT count(*) FROM {_q(late)}"))
            elif await conn.fetchval(f"SELECT EXISTS (SELECT FROM {_q(late)})"):
                raise JustArrived
            notes = await conn.fetch(
                "SELECT obj_description(to_regclass(s), 'pg_class') FROM unnest($1::text[]) s",
                [_q(p.staging) for p in pieces],
            )
            rows = sum(int(json.loads(n[0])[STATE_KEY]["rows"]) for n in notes)
            script = await _swap_script(conn, part, pieces, late, now, notes, closed_before_us)
            await conn.execute(script)
            # The commit follows: it releases the locks first, then deletes the old files.
            done = time.perf_counter()
    except asyncpg.LockNotAvailableError:
        raise Busy(f"a lock was not granted within {lock_timeout_s:g} s") from None
    return rows, done - locked, moved


async def _swap_script(
    conn: asyncpg.Connection,
    part: PartitionInfo,
    pieces: list[Piece],
    late: str,
    now: dt.datetime,
    notes: Sequence[asyncpg.Record],
    closed_before_us: int,
) -> str:
    default = _q(DEFAULT_PARTITION)
    script = [
        f"ALTER TABLE {TABLE} DETACH PARTITION {_q(part.name)}",
        f"DROP TABLE {_q(part.name)}",
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
        ]
        closed = piece.end_us <= closed_before_us
        note = _literal(parts.compacted_note(now, rows)) if closed else "NULL"
        script.append(f"COMMENT ON TABLE {_q(piece.name)} IS {note}")
    if spare_scans:
        script.append(f"ALTER TABLE {default} DROP CONSTRAINT {DEFAULT_EXCLUSION}")
    # Captured rows of periods no piece covers: where the table routes them now.
    script += [
        f"INSERT INTO {TABLE} ({_COLUMNS}) SELECT {_COLUMNS} FROM {_q(late)}",
        f"DROP TABLE {_q(late)}",
    ]
    names = ", ".join(_literal(p.name) for p in pieces)
    script.append(
        parts.tidy_index_names(
            f"t.relname IN ({names}) AND NOT x.indisprimary"
            " AND t.relnamespace = current_schema()::regnamespace"
        ).strip()
    )
    return ";\n".join(script) + ";"


# -- what an interrupted run left -------------------------------------------------------------


async def leftovers(conn: asyncpg.Connection) -> dict[str, Any]:
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


async def clean_leftovers(
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
        await abandon(conn, source, tables, late, lock_timeout_s)
        say(f"dropped what an interrupted compaction of {source} left")


async def abandon(
    conn: asyncpg.Connection,
    source: str,
    tables: list[str],
    late: str | None,
    lock_timeout_s: float,
) -> None:
    """Drop an attempt's tables, then its triggers on ``source``. When ``source`` is busy (a
    ``prune`` exporting it, say) its triggers stay for the next run to drop: the capture
    function skips a missing side table and the guard still only refuses changes."""
    async with conn.transaction():
        for table in [*tables, *([late] if late else [])]:
            await conn.execute(f"DROP TABLE IF EXISTS {_q(table)}")
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
            await conn.execute(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})")
            await _drop_triggers(conn, source)
    except asyncpg.LockNotAvailableError:
        pass


async def _drop_triggers(conn: asyncpg.Connection, source: str) -> None:
    """Drop this package's triggers on ``source``, only those there are (a ``DROP TRIGGER``
    locks the table out even when the trigger does not exist)."""
    found = await conn.fetch(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = ANY ($2)",
        _q(source),
        [CAPTURE, GUARD, GUARD_TRUNCATE],
    )
    for (trigger,) in found:
        try:
            async with conn.transaction():  # a savepoint when the caller's transaction is open
                await conn.execute(f"DROP TRIGGER {_q(trigger)} ON {_q(source)}")
        except asyncpg.UndefinedTableError:  # dropped meanwhile (by prune), triggers with it
            return


async def drop_functions_if_unused(conn: asyncpg.Connection) -> None:
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
