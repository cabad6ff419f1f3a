"""Compaction: closed partitions rewritten in (symbol, timestamp, id) order, one per period.

Rows arrive interleaved (every symbol's quotes in arrival order), so a one-symbol read of a
partition touches a block for every few rows; the same rows ordered by (symbol, timestamp, id)
sit together, and the read touches a small fraction of the blocks. ``compact(engine)``
rewrites every *closed* partition (its whole range in the past) not compacted yet, including
the historical partition revision 0004 adopts from a plain table, which it splits into one
partition per period so ``prune`` can retire its days one by one. That history's range reaches
the period the upgrade ran in (the live writer's rows go into it), so it is split as soon as
it spans a past period: each past period holding rows becomes a compacted partition, and the
current and next periods ordinary ones, compacted once they are over; past periods without a
row get no partition (a row written later for one goes to the default partition, as for any
time no partition covers). Until the swap, the writers' rows pass through the capture trigger.

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
   no row arrived since step 3 (else back to 3; if rows keep arriving, the third swap moves
   them itself), detaches and drops ``P`` and attaches the new tables under their final
   names, each with a comment recording the compaction.

Writers wait only for the swap (milliseconds: no row is copied and no index built under the
lock); a statement sees either ``P`` or the new tables, never both or neither. As with any
rewrite (``CLUSTER``, ``VACUUM FULL``), a ``REPEATABLE READ`` transaction that took its
snapshot before step 3 and first reads the table after the swap would miss the rows; step 3's
wait is what rules that out (only rows a swap moves itself escape it, and only for a snapshot
taken in the milliseconds before that swap). Each run compacts partitions one at a time and
holds a session advisory lock, so runs take turns; the structural steps hold ``ensure``'s and
``prune``'s transaction lock too. Idempotent (a compacted partition is skipped; nothing to do
takes no lock) and resumable: a killed run leaves whole steps behind (each is one
transaction), which the next run finds by the JSON comment on each table it made, reuses,
and completes. The steps themselves are in ``compaction_steps``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.ops import compaction_steps as steps
from orderbook_store.ops import partitions as parts
from orderbook_store.ops.partitions import (
    TABLE,
    PartitionError,
    PartitionInfo,
    Period,
)
from orderbook_store.pg.connection import raw_connection
from orderbook_store.times import day_of, day_start_us, from_us

__all__ = [
    "SESSION_LOCK_KEY",
    "CompactResult",
    "CompactedPartition",
    "compact",
    "compactable",
    "reaching_now",
]

#: Key of the session advisory lock a compaction run holds from start to end.
SESSION_LOCK_KEY = 0x0B5_9A28

ProgressFn = Callable[[str], None]


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


def _us(moment: dt.datetime) -> int:
    return (moment - from_us(0)) // dt.timedelta(microseconds=1)


def _now_us() -> int:
    return _us(dt.datetime.now(dt.timezone.utc))


# -- what to compact --------------------------------------------------------------------------


def _closed(found: Sequence[PartitionInfo], now_us: int) -> list[PartitionInfo]:
    return [p for p in found if p.end_us is not None and p.end_us <= now_us]


def reaching_now(
    found: Sequence[PartitionInfo], period: Period, now_us: int
) -> list[PartitionInfo]:
    """Partitions spanning past periods and the current one: the history revision 0004 adopts
    from a table still being written, whose range reaches the current period. Its past
    periods are split out (compacted) and the rest becomes ordinary partitions."""
    current = day_start_us(parts.period_start(day_of(now_us), period))
    return [
        p
        for p in found
        if p.start_us is not None and p.end_us is not None and p.start_us < current < p.end_us
    ]


async def compactable(
    engine: AsyncEngine, *, now: dt.datetime | None = None
) -> list[PartitionInfo]:
    """What ``compact`` would rewrite: closed partitions not compacted yet, oldest first, then
    any partition spanning past periods and the current one (see ``reaching_now``)."""
    now_us = _now_us() if now is None else _us(now)
    found = await parts.list_partitions(engine)
    return _todo(found, parts.infer_period(found), now_us)


def _todo(found: Sequence[PartitionInfo], period: Period, now_us: int) -> list[PartitionInfo]:
    closed = [p for p in _closed(found, now_us) if p.compacted_at is None]
    return closed + reaching_now(found, period, now_us)


def _periods(part: PartitionInfo, period: Period) -> list[tuple[int, int]]:
    """``part``'s range cut at the boundaries of ``period``."""
    assert part.start_us is not None and part.end_us is not None
    cuts: list[tuple[int, int]] = []
    start = parts.period_start(day_of(part.start_us), period)
    while day_start_us(start) < part.end_us:
        following = parts.next_period(start, period)
        lo = max(day_start_us(start), part.start_us)
        cuts.append((lo, min(day_start_us(following), part.end_us)))
        start = following
    return cuts


async def _pieces(
    conn: asyncpg.Connection, part: PartitionInfo, period: Period, taken: set[str], now_us: int
) -> list[steps.Piece]:
    """The partitions that will replace ``part``, named as ``ensure`` names them: one per
    period. Of a range spanning several periods, only the periods holding rows, the current one
    and the next (the writers' next rows) are kept: an adopted table's history can span years
    with rows in a few days, and a partition per empty day would be thousands of tables."""
    cuts = _periods(part, period)
    if len(cuts) > 1:
        held = await steps.periods_holding_rows(conn, part, [lo for lo, _ in cuts] + [cuts[-1][1]])
        live = sorted(lo for lo, hi in cuts if hi > now_us)[:2]  # the current period, the next
        cuts = [(lo, hi) for lo, hi in cuts if lo in held or lo in live]
    pieces: list[steps.Piece] = []
    names = set(taken) - {part.name}
    for lo, hi in cuts:
        name = parts.partition_name(lo, hi, names)
        names.add(name)
        pieces.append(steps.Piece(lo, hi, name))
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
            # Polled, not waited for in one statement: a waiting statement holds a snapshot, and
            # the running compaction waits for old snapshots to end before each swap.
            said = False
            while not await conn.fetchval(
                "SELECT pg_try_advisory_lock($1::bigint)", SESSION_LOCK_KEY
            ):
                if not said:
                    say("another compaction is running: waiting for it to finish")
                    said = True
                await asyncio.sleep(0.5)
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
    todo = _todo(found, chosen, now_us)
    result.already_compacted = sum(p.compacted_at is not None for p in closed)
    state = await steps.leftovers(conn)
    await steps.clean_leftovers(conn, state, {p.name for p in todo}, lock_timeout_s, say)
    taken = {str(r[0]) for r in await conn.fetch(_RELATIONS_SQL)}
    todo.sort(key=lambda p: (p.name not in state["sources"], p.start_us or 0))
    for part in todo:
        done = await _compact_one(
            conn, part, chosen, taken, state, now_us, lock_timeout_s, snapshot_wait_s, say
        )
        if done is not None:
            result.compacted.append(done)
    await steps.drop_functions_if_unused(conn)
    return result


_RELATIONS_SQL = "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace"


async def _compact_one(
    conn: asyncpg.Connection,
    part: PartitionInfo,
    period: Period,
    taken: set[str],
    state: dict[str, Any],
    now_us: int,
    lock_timeout_s: float,
    snapshot_wait_s: float,
    say: ProgressFn,
) -> CompactedPartition | None:
    """Steps 1 to 4 for ``part`` (resumed where an earlier run stopped); ``None`` when it was
    detached meanwhile (pruned), and nothing is left of the attempt."""
    started = time.perf_counter()
    late = state["sources"].get(part.name, f"{part.name}_late")
    built: dict[str, dict[str, Any]] = state["staging"].get(part.name, {})
    if len(late.encode()) > 63:
        raise PartitionError(f"partition name {part.name!r} is too long to compact")
    resuming = part.name in state["sources"]
    if not resuming:
        say(f"compacting {part.name} ({_range_text(part)})")
        try:
            await steps.with_retries(
                lambda: steps.start_capture(conn, part, late, lock_timeout_s), lock_timeout_s, say
            )
        except steps.Gone:
            say(f"skipped {part.name}: no longer attached")
            return None
    pieces: list[steps.Piece] = []
    try:
        # Chosen once rows are captured, so a row of a period found empty is not missed.
        pieces = await _pieces(conn, part, period, taken, now_us)
        taken.update(piece.name for piece in pieces)
        for piece in pieces:
            if len((piece.staging + "_range").encode()) > 63:
                raise PartitionError(f"partition name {part.name!r} is too long to compact")
        if resuming:
            say(f"resuming {part.name} ({len(built)} of {len(pieces)} sorted copies built)")
        else:
            into = "in place" if len(pieces) == 1 else f"into {len(pieces)} partitions"
            say(f"{part.name}: {into}")
        return await _build_and_swap(
            conn, part, pieces, built, late, now_us, lock_timeout_s, snapshot_wait_s, say, started
        )
    except steps.Gone:
        stagings = sorted(set(built) | {p.staging for p in pieces})
        await steps.abandon(conn, part.name, stagings, late, lock_timeout_s)
        say(f"skipped {part.name}: it was detached meanwhile; its sorted copies are dropped")
        return None


async def _build_and_swap(
    conn: asyncpg.Connection,
    part: PartitionInfo,
    pieces: list[steps.Piece],
    built: dict[str, dict[str, Any]],
    late: str,
    now_us: int,
    lock_timeout_s: float,
    snapshot_wait_s: float,
    say: ProgressFn,
    started: float,
) -> CompactedPartition:
    """Steps 2 to 4 (``steps.Gone`` when ``part`` is detached meanwhile)."""
    for stale in set(built) - {piece.staging for piece in pieces}:  # made for another period
        await steps.drop_table(conn, stale)
    for piece in pieces:
        meta = built.get(piece.staging)
        if meta is not None and (meta["start_us"], meta["end_us"], meta["name"]) == (
            piece.start_us,
            piece.end_us,
            piece.name,
        ):
            continue
        if meta is not None:  # made for another range: not ours to reuse
            await steps.drop_table(conn, piece.staging)
        building = time.perf_counter()
        rows = await steps.build(conn, part, piece, multi=len(pieces) > 1)
        say(f"built {piece.staging} ({rows:,} rows) in {time.perf_counter() - building:.1f} s")
    for piece in pieces:
        await steps.vacuum(conn, piece.staging)
    late_rows = busy = just_arrived = 0
    while True:
        moved, xid = await steps.catch_up(conn, late, pieces)
        late_rows += moved
        await steps.wait_for_older_snapshots(conn, xid, snapshot_wait_s, say)
        try:
            take_late = just_arrived >= steps.LATE_RETRIES
            rows, lock_s, moved = await steps.swap(
                conn,
                part,
                pieces,
                late,
                lock_timeout_s,
                take_late=take_late,
                closed_before_us=now_us,
            )
        except steps.JustArrived:
            just_arrived += 1
            continue
        except steps.Busy as reason:
            if busy == len(steps.LOCK_RETRY_DELAYS_S):
                raise PartitionError(
                    f"{TABLE} stayed locked by other sessions at every attempt to swap "
                    f"{part.name}; its sorted copies are kept: run compact again later to finish"
                ) from None
            say(f"swap of {part.name} postponed ({reason}); trying again")
            await asyncio.sleep(steps.LOCK_RETRY_DELAYS_S[busy])
            busy += 1
            continue
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
