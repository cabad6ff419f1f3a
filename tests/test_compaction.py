"""Compaction: closed partitions rewritten in (symbol, timestamp, id) order, nothing lost.

Every test gets its own database (``make_database``); the ones that kill a compaction or time a
writer run it as a separate process, as cron would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from test_partitions import (
    DAY_US,
    JAN_1_2024,
    SYMBOLS,
    at_head,
    checksum,
    engine_on,
    fetch,
    fill,
    quote,
    where_rows_are,
)
from typer.testing import CliRunner

from orderbook_store.cli.partitions import app as partitions_app
from orderbook_store.errors import ConfigError
from orderbook_store.ops import compaction, migrations, partitions
from orderbook_store.ops.doctor import run_checks
from orderbook_store.ops.roles import RoleNames, roles_sql
from orderbook_store.read.plan import plan_quotes
from orderbook_store.read.reader import Reader
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings

from catalog import execute
from pgserver import TemporaryPostgres

MakeDb = Callable[[], str]

PROJECT = Path(__file__).resolve().parent.parent
UTC = dt.timezone.utc
#: 2024-01-31: every day of the filled January is closed, the partitions of "today" are not.
AFTER_JANUARY = dt.datetime(2024, 1, 31, tzinfo=UTC)

#: Rows (by physical order) that come before their predecessor in (symbol, timestamp, id).
OUT_OF_ORDER_SQL = """
SELECT count(*) FROM (
    SELECT (symbol, timestamp, id) < lag((symbol, timestamp, id)) OVER (ORDER BY ctid) AS back
    FROM {table}
) t WHERE back
"""

#: Every value of every row: count, id sum, and one digest in id order.
EXACT_SQL = """
SELECT count(*), sum(id), md5(string_agg(o::text, ',' ORDER BY id)) FROM orderbook_data o
"""


async def legacy_at_head(make_database: MakeDb, rows: int, **fill_args: int) -> str:
    """A plain table of ``rows`` January 2024 quotes, then upgraded: one historical partition."""
    url = await at_head(make_database, "0003")
    await fill(url, rows, **fill_args)
    await asyncio.to_thread(_upgrade, url)
    assert set(await where_rows_are(url)) == {"orderbook_data_history"}
    return url


def _upgrade(url: str) -> None:
    migrations.upgrade(Settings(database_url=url), "head")


async def exact(url: str) -> tuple[int, int, str]:
    row = (await fetch(url, EXACT_SQL))[0]
    return row[0], row[1], row[2]


async def leftovers(url: str) -> list[str]:
    """Anything a compaction made and did not clean up: tables, triggers, functions."""
    rows = await fetch(
        url,
        """
        SELECT relname FROM pg_class
        WHERE obj_description(oid, 'pg_class') LIKE '{"orderbook_compaction":%'
        UNION ALL SELECT tgname FROM pg_trigger WHERE tgname LIKE 'orderbook_compaction%'
        UNION ALL SELECT proname FROM pg_proc WHERE proname LIKE 'orderbook_compaction%'
        UNION ALL SELECT conname FROM pg_constraint WHERE conname LIKE 'orderbook_compaction%'
        """,
    )
    return [r[0] for r in rows]


async def compact(url: str, **kwargs: object) -> compaction.CompactResult:
    async with engine_on(url) as engine:
        return await compaction.compact(engine, **kwargs)  # type: ignore[arg-type]


def normalized_shape(rows: list[asyncpg.Record], table: str) -> list[str]:
    return sorted(str(r[0]).replace(table.removeprefix("orderbook_data_"), "X") for r in rows)


async def shape(url: str, table: str) -> dict[str, list[str]]:
    """Columns, constraints and indexes of one partition, with its own name taken out."""
    columns = await fetch(
        url,
        "SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull "
        "|| ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '') FROM pg_attribute a "
        "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
        "WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped",
        table,
    )
    constraints = await fetch(
        url,
        "SELECT conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = $1::regclass",
        table,
    )
    indexes = await fetch(
        url, "SELECT indexname || ' ' || indexdef FROM pg_indexes WHERE tablename = $1", table
    )
    return {
        "columns": sorted(str(r[0]) for r in columns),
        "constraints": normalized_shape(constraints, table),
        "indexes": normalized_shape(indexes, table),
    }


# -- what compaction makes ----------------------------------------------------------------------


async def write_until_done(
    task: asyncio.Task[object],
    repo: OrderbookRepository,
    day_for: Callable[[int, int], int],
) -> int:
    """Quotes through ``repo`` in tens until ``task`` is done and at least 2,000 went in, then
    flushed; the ``k``-th of a ten after ``n`` quotes is on the day ``day_for(n, k)`` starts.
    Returns how many were added (every one a distinct symbol and timestamp)."""
    added = 0
    while not task.done() or added < 2_000:
        for k in range(10):
            await repo.add(quote(SYMBOLS[k % 4], day_for(added, k) + 7 + added + k))
        added += 10
        await asyncio.sleep(0.003)
    await repo.flush()
    return added


async def test_compaction_splits_the_history_into_sorted_days_keeping_every_row_and_id(
    make_database: MakeDb,
) -> None:
    url = await legacy_at_head(make_database, 60_000)
    # The history's range reaches today (revision 0004 leaves room for the live writer), so
    # late rows of Feb 1 and 2, 2024 land in it too; most of its ~1,000 days hold no row.
    await fill(url, 4_000, start=JAN_1_2024 + 31 * DAY_US, span=2 * DAY_US)
    # rows no partition covers, in the default partition, which every attach must consider
    await execute(
        url,
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) "
        "VALUES ('BTCUSDT', 1924992000000000, 1924992000000000)",
    )
    before = await exact(url)
    assert (await fetch(url, OUT_OF_ORDER_SQL.format(table="orderbook_data_history")))[0][0] > 0
    history = {p.name: p for p in await partitions_of(url)}["orderbook_data_history"]
    assert history.end is not None
    now = dt.datetime.now(UTC)
    today = now.date()
    # the writers' partitions: today's and tomorrow's, where the history's range has them
    live = [d for d in (today, today + dt.timedelta(days=1)) if d < history.end.date()]

    result = await compact(url, now=now)

    assert await exact(url) == before
    january = [f"orderbook_data_p202401{day:02d}" for day in range(1, 31)]
    february = ["orderbook_data_p20240201", "orderbook_data_p20240202"]
    made = [f"orderbook_data_p{day:%Y%m%d}" for day in live]
    assert [c.source for c in result.compacted] == ["orderbook_data_history"]
    assert result.compacted[0].partitions == january + february + made
    assert result.rows == 64_000
    assert result.compacted[0].late_rows == 0
    assert 0 < result.longest_lock_s < 0.5
    where = await where_rows_are(url)
    assert "orderbook_data_history" not in where
    assert [where[name] for name in january] == [2_000] * 30
    assert [where[name] for name in february] == [2_000, 2_000]
    for name in january + february:
        assert (await fetch(url, OUT_OF_ORDER_SQL.format(table=name)))[0][0] == 0, name

    listed = {p.name: p for p in await partitions_of(url)}
    # the empty days between are left to the default partition and to `ensure`
    assert "orderbook_data_p20240203" not in listed
    assert all(listed[name].compacted_at is not None for name in january + february)
    # today's and tomorrow's are ordinary partitions, compacted once their day is over
    assert all(listed[name].compacted_at is None for name in made)
    comment = await fetch(url, "SELECT obj_description('orderbook_data_p20240115'::regclass)")
    assert "2000 rows ordered by (symbol, timestamp, id)" in comment[0][0]
    # a compacted day has exactly the shape of a day the upgrade made ahead of time
    ahead = min(
        (p for p in listed.values() if p.start is not None and p.start >= history.end),
        key=lambda p: p.start_us or 0,
    )
    assert await shape(url, "orderbook_data_p20240115") == await shape(url, ahead.name)
    assert await leftovers(url) == []
    # the sequence goes on where it was
    await execute(
        url,
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) "
        f"VALUES ('ETHUSDT', {JAN_1_2024 + 5}, {JAN_1_2024 + 5})",
    )
    assert (await fetch(url, "SELECT max(id) FROM orderbook_data_p20240101"))[0][0] == 64_002


async def test_a_live_writer_keeps_writing_into_the_history_while_it_is_split(
    make_database: MakeDb,
) -> None:
    """Today's quotes flow into the history until the swap, then into today's partition; a
    late quote for a day that held no row when the pieces were chosen is kept (in the default
    partition, where any row no partition covers goes)."""
    url = await legacy_at_head(make_database, 100_000)
    before = await checksum(url)
    gap = 0
    async with (
        engine_on(url) as engine,
        OrderbookRepository(engine, batch_size=20, flush_interval_s=0.005) as repo,
    ):
        said: list[str] = []
        task = asyncio.create_task(compaction.compact(engine, progress=said.append))

        def day_for(_n: int, k: int) -> int:
            nonlocal gap
            chosen = any(line.startswith("built ") for line in said)  # the pieces are chosen
            if k == 9 and chosen:  # a day of 2024 that held no row
                gap += 1
                return JAN_1_2024 + 200 * DAY_US
            return int(time.time() * 1e6)

        added = await write_until_done(task, repo, day_for)
        result = await task
    assert result.compacted[0].source == "orderbook_data_history"
    stored = await fetch(
        url,
        "SELECT count(*), count(DISTINCT id), count(DISTINCT (symbol, timestamp)) "
        "FROM orderbook_data",
    )
    total = before[0] + added
    assert tuple(stored[0]) == (total, total, total)
    # today's quotes are in today's partition, not in the default one
    gap_rows = await fetch(
        url,
        "SELECT count(*), count(*) FILTER (WHERE timestamp >= "
        f"{JAN_1_2024 + 200 * DAY_US} AND timestamp < {JAN_1_2024 + 201 * DAY_US}) "
        "FROM orderbook_data_default",
    )
    assert gap_rows[0][0] == gap_rows[0][1]
    assert gap_rows[0][1] == gap > 0
    assert "orderbook_data_p20240719" not in await where_rows_are(url)
    assert await leftovers(url) == []


async def partitions_of(url: str) -> list[partitions.PartitionInfo]:
    async with engine_on(url) as engine:
        return await partitions.list_partitions(engine)


async def test_each_day_of_the_split_history_can_then_be_pruned(
    make_database: MakeDb, tmp_path: Path
) -> None:
    url = await legacy_at_head(make_database, 30_000)
    await compact(url, now=AFTER_JANUARY)
    kept = await fetch(
        url,
        "SELECT count(*), sum(id), md5(string_agg(o::text, ',' ORDER BY id)) "
        f"FROM orderbook_data o WHERE timestamp >= {JAN_1_2024 + 10 * DAY_US}",
    )
    async with engine_on(url) as engine:
        pruned = await partitions.prune(engine, dt.date(2024, 1, 11), archive_dir=tmp_path)
    assert pruned.dropped == [f"orderbook_data_p202401{day:02d}" for day in range(1, 11)]
    assert pruned.rows == 10_000
    assert len(pruned.files) == 40  # a file per symbol and day
    rest = await fetch(
        url,
        "SELECT count(*), sum(id), md5(string_agg(o::text, ',' ORDER BY id)) FROM orderbook_data o",
    )
    assert rest == kept


async def test_a_second_run_does_nothing_and_takes_no_lock(make_database: MakeDb) -> None:
    url = await legacy_at_head(make_database, 10_000)
    first = await compact(url, now=AFTER_JANUARY)
    assert len(first.compacted) == 1
    files = await fetch(url, "SELECT relname, relfilenode FROM pg_class ORDER BY 1")
    # A reader holding the table in an open transaction: any lock a run took would wait for it.
    reader = await asyncpg.connect(url)
    try:
        await reader.execute("BEGIN; SELECT count(*) FROM orderbook_data")
        started = time.monotonic()
        second = await compact(url, now=AFTER_JANUARY, lock_timeout_s=0.05)
        took = time.monotonic() - started
        await reader.execute("COMMIT")
    finally:
        await reader.close()
    assert second.compacted == []
    assert second.already_compacted == 30
    assert took < 5
    assert await fetch(url, "SELECT relname, relfilenode FROM pg_class ORDER BY 1") == files


# -- writers and readers meanwhile -------------------------------------------------------------


async def test_rows_written_into_a_partition_while_it_is_compacted_are_kept(
    make_database: MakeDb,
) -> None:
    url = await legacy_at_head(make_database, 150_000)
    before = await checksum(url)
    async with (
        engine_on(url) as engine,
        OrderbookRepository(engine, batch_size=20, flush_interval_s=0.005) as repo,
    ):
        task = asyncio.create_task(compaction.compact(engine, now=AFTER_JANUARY))

        def day_for(n: int, k: int) -> int:
            # late quotes for the January being compacted, and quotes of today
            if k % 2:
                return JAN_1_2024 + ((n + k) % 30) * DAY_US
            return int(time.time() * 1e6)

        added = await write_until_done(task, repo, day_for)
        result = await task
    assert result.compacted[0].late_rows > 0  # some arrived during the copy and were caught up
    stored = await fetch(
        url,
        "SELECT count(*), count(DISTINCT id), count(DISTINCT (symbol, timestamp)), max(id) "
        "FROM orderbook_data",
    )
    total = before[0] + added
    assert tuple(stored[0]) == (total, total, total, total)
    # the rows of January, the late ones included, all sit in January's new partitions
    january = await fetch(
        url,
        f"SELECT count(*) FROM orderbook_data WHERE timestamp < {JAN_1_2024 + 30 * DAY_US}",
    )
    assert january[0][0] == before[0] + added // 2
    assert await leftovers(url) == []


async def stored_in_symbol_order(engine: AsyncEngine, reader: Reader, day: tuple[int, int]) -> bool:
    """Whether ``reader`` takes ``day``'s rows of ``SYMBOLS`` for stored in symbol order (and
    so reads them on one connection)."""
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        _, _, clustered = await reader._parts(raw, plan_quotes(SYMBOLS, *day))
    return clustered


async def test_readers_during_compaction_see_every_row_exactly_once(
    make_database: MakeDb,
) -> None:
    url = await legacy_at_head(make_database, 120_000)
    whole = tuple((await fetch(url, "SELECT count(*), sum(id) FROM orderbook_data"))[0])
    day = (JAN_1_2024 + 9 * DAY_US, JAN_1_2024 + 10 * DAY_US)
    async with engine_on(url) as engine:
        reader = Reader(engine)
        reader.parallel_min_rows = 100  # two connections sharing one exported snapshot
        one_day = await reader.quotes(SYMBOLS, *day, exact=True)
        assert not await stored_in_symbol_order(engine, reader, day)  # the history: scattered
        reads: dict[str, int] = {"statement": 0, "repeatable read": 0, "reader": 0}
        task = asyncio.create_task(compaction.compact(engine, now=AFTER_JANUARY))

        async def statements() -> None:
            conn = await asyncpg.connect(url)
            try:
                while not task.done():
                    got = await conn.fetchrow("SELECT count(*), sum(id) FROM orderbook_data")
                    assert tuple(got) == whole
                    reads["statement"] += 1
            finally:
                await conn.close()

        async def repeatable_reads() -> None:
            # The snapshot is taken first, the table read a moment later: the swap may fall
            # in between, and the new partitions' rows must still be visible to it.
            conn = await asyncpg.connect(url)
            try:
                while not task.done():
                    async with conn.transaction(isolation="repeatable_read"):
                        await conn.fetchval("SELECT 1")
                        await asyncio.sleep(0.01)
                        got = await conn.fetchrow("SELECT count(*), sum(id) FROM orderbook_data")
                    assert tuple(got) == whole
                    reads["repeatable read"] += 1
            finally:
                await conn.close()

        async def frames() -> None:
            while not task.done():
                got = await reader.quotes(SYMBOLS, *day, exact=True)
                assert got.equals(one_day)
                reads["reader"] += 1

        await asyncio.gather(statements(), repeatable_reads(), frames(), task)
        # The compacted day is stored in symbol order: one connection reads it, the same rows.
        assert await stored_in_symbol_order(engine, reader, day)
        assert (await reader.quotes(SYMBOLS, *day, exact=True)).equals(one_day)
        assert reader.last_read_connections == 1
    assert len(task.result().compacted) == 1
    assert min(reads.values()) >= 3, reads


# -- interruptions ------------------------------------------------------------------------------


def start_compaction(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "orderbook_store", "partitions", "compact"],
        cwd=PROJECT,
        env={"DATABASE_URL": url, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_after(run: subprocess.Popen[str], line_has: str, nth: int, delay_s: float) -> bool:
    """SIGKILL ``run`` ``delay_s`` after the ``nth`` line it prints holding ``line_has``;
    False when it finished first."""
    assert run.stdout is not None
    seen = 0
    for line in run.stdout:
        if line_has in line:
            seen += 1
            if seen == nth:
                time.sleep(delay_s)
                run.send_signal(signal.SIGKILL)
                run.wait()
                return True
    run.wait()
    return False


@pytest.mark.slow
async def test_a_killed_compaction_resumes_and_completes_with_every_row(
    make_database: MakeDb, tmp_path: Path
) -> None:
    # January as it was adopted by 0004: closed by the real clock, as cron would see it.
    url = await legacy_at_head(make_database, 240_000)
    before = await exact(url)
    killed_with_state = 0
    kill_points = [
        ("compacting", 1, 0.0),  # while the capture starts or the first copy is made
        ("built orderbook", 2, 0.0),  # between copies
        ("resuming", 1, 0.03),  # in the middle of a copy
        ("built orderbook_data_p20240130", 1, 0.0),  # all built: vacuum, catch up, swap
        ("resuming", 1, 0.0),  # the same, from a resumed run
    ]
    late = 0
    for line_has, nth, delay_s in kill_points:
        run = await asyncio.to_thread(start_compaction, url)
        killed = await asyncio.to_thread(kill_after, run, line_has, nth, delay_s)
        if killed and await leftovers(url):
            killed_with_state += 1
            # an interrupted compaction: every row is still read once, late rows are kept,
            # and changing rows of the captured partition is refused with a reason
            assert (await exact(url))[:2] == (before[0] + late, before[1] + _late_ids(late))
            with pytest.raises(asyncpg.ObjectInUseError, match="being compacted"):
                await execute(url, "DELETE FROM orderbook_data WHERE id = 1")
            doctor = (await run_checks(Settings(database_url=url, spool_dir=tmp_path))).check(
                "compaction"
            )
            assert doctor.status == "warn" and "interrupted" in doctor.value, doctor
        await execute(
            url,
            "INSERT INTO orderbook_data (id, symbol, timestamp, local_timestamp) "
            f"VALUES ({1_000_000 + late}, 'XRPUSDT', {JAN_1_2024 + late}, {JAN_1_2024})",
        )
        late += 1
    assert killed_with_state >= 3

    run = await asyncio.to_thread(start_compaction, url)
    out, err = await asyncio.to_thread(run.communicate)
    assert run.returncode == 0, err
    assert "resuming orderbook_data_history" in out or "compacting" not in out
    after = await exact(url)
    assert after[:2] == (before[0] + late, before[1] + _late_ids(late))
    original = await fetch(
        url,
        "SELECT count(*), sum(id), md5(string_agg(o::text, ',' ORDER BY id)) "
        "FROM orderbook_data o WHERE id < 1000000",
    )
    assert tuple(original[0]) == before
    assert await leftovers(url) == []
    where = await where_rows_are(url)
    assert "orderbook_data_history" not in where
    assert sum(where.values()) == before[0] + late
    listed = await partitions_of(url)
    january = [p for p in listed if p.end is not None and p.end <= AFTER_JANUARY]
    assert len(january) == 30
    assert all(p.compacted_at is not None for p in january)


def _late_ids(count: int) -> int:
    return sum(1_000_000 + k for k in range(count))


# -- the command line and doctor -----------------------------------------------------------------


def test_compact_refuses_an_unknown_period_and_an_unpartitioned_table(
    make_database: MakeDb,
) -> None:
    url = make_database()
    migrations.upgrade(Settings(database_url=url), "0003")
    with pytest.raises(partitions.PartitionError, match="upgrade"):
        asyncio.run(compact(url))
    migrations.upgrade(Settings(database_url=url), "head")
    with pytest.raises(ConfigError, match="'fortnight'"):
        asyncio.run(compact(url, period="fortnight"))


def test_compact_command_line_list_and_doctor(make_database: MakeDb, tmp_path: Path) -> None:
    url = asyncio.run(legacy_at_head(make_database, 6_000))
    env = {"DATABASE_URL": url}
    runner = CliRunner()
    settings = Settings(database_url=url, spool_dir=tmp_path)

    # the history's range reaches today: not closed, but none of its days can be pruned
    doctor = asyncio.run(run_checks(settings)).check("compaction")
    assert doctor.status == "warn"
    assert doctor.value == (
        "0 of 0 closed partitions compacted; orderbook_data_history spans past days and today"
    )
    assert "orderbook-store partitions compact" in doctor.detail

    pooled = runner.invoke(partitions_app, ["compact"], env={**env, "DB_PGBOUNCER": "true"})
    assert isinstance(pooled.exception, partitions.PartitionError)
    assert "not through PgBouncer" in str(pooled.exception)

    dry = runner.invoke(partitions_app, ["compact", "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    assert "would compact orderbook_data_history (2024-01-01 .. " in dry.output

    done = runner.invoke(partitions_app, ["compact", "--json"], env=env)
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 6_000
    assert summary["compacted"][0]["source"] == "orderbook_data_history"
    split = summary["compacted"][0]["partitions"]
    assert split[:30] == [f"orderbook_data_p202401{day:02d}" for day in range(1, 31)]
    assert len(split) in (31, 32)  # and today's (and tomorrow's, where the range has it)
    assert 0 < summary["longest_lock_s"] < 0.5
    assert "swapped orderbook_data_history" in done.stderr  # progress on stderr

    again = runner.invoke(partitions_app, ["compact"], env=env)
    assert again.exit_code == 0, again.output
    assert "0 partitions compacted" in again.output
    assert "30 already compacted" in again.output

    listed = runner.invoke(partitions_app, ["list", "--json"], env=env)
    rows = [json.loads(line) for line in listed.output.splitlines()]
    compacted = [r for r in rows if r["compacted_at"] is not None]
    assert len(compacted) == 30
    assert dt.datetime.fromisoformat(compacted[0]["compacted_at"]).tzinfo is not None
    table = runner.invoke(partitions_app, ["list"], env=env)
    assert "compacted" in table.output

    doctor = asyncio.run(run_checks(settings)).check("compaction")
    assert (doctor.status, doctor.value) == ("ok", "30 of 30 closed partitions compacted")


# -- other roles' transactions -------------------------------------------------------------------


@pytest.mark.slow
async def test_an_older_snapshot_of_another_role_is_waited_for_and_late_rows_kept() -> None:
    """As in production: the owner compacts, a reader role holds a snapshot from before the
    sorted copies were made, the writer role writes a late row meanwhile."""
    names = RoleNames()
    with TemporaryPostgres() as server:
        server.create_database("quotes")
        admin = server.url("quotes")

        def as_role(role: str) -> str:
            return admin.replace("postgres@", f"{role}@")

        await execute(admin, roles_sql(names))
        await asyncio.to_thread(
            migrations.upgrade, Settings(database_url=as_role(names.owner)), "0003"
        )
        await fill(as_role(names.owner), 30_000)
        await asyncio.to_thread(
            migrations.upgrade, Settings(database_url=as_role(names.owner)), "head"
        )
        await execute(admin, roles_sql(names))  # grants on the tables 0004 made
        before = await checksum(admin)

        reader = await asyncpg.connect(as_role(names.reader))
        try:
            await reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")  # snapshot
            lines: list[str] = []
            async with engine_on(as_role(names.owner)) as engine:
                task = asyncio.create_task(
                    compaction.compact(engine, now=AFTER_JANUARY, progress=lines.append)
                )
                while not task.done() and not any("older snapshots" in x for x in lines):
                    await asyncio.sleep(0.02)
                assert not task.done(), lines
                # The writer role's late quote for January, while the run waits: captured
                # through the owner's trigger function, kept by the swap.
                await execute(
                    as_role(names.writer),
                    "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) "
                    f"VALUES ('XRPUSDT', {JAN_1_2024 + 7}, {JAN_1_2024 + 7})",
                )
                # The reader's old snapshot still sees every row: nothing was swapped under it.
                seen = await reader.fetchval("SELECT count(*) FROM orderbook_data")
                await reader.execute("COMMIT")
                result = await task
        finally:
            await reader.close()
        assert seen == before[0]
        assert len(result.compacted) == 1
        assert result.compacted[0].late_rows == 1
        after = await checksum(admin)
        assert after[0] == before[0] + 1
        assert await leftovers(admin) == []


@pytest.mark.slow
async def test_a_writer_is_never_held_up_long_by_a_compaction(make_database: MakeDb) -> None:
    """A probe inserting every 20 ms while the adopted history is split: its longest insert is
    what a writer feels (the swap's lock, and nothing else)."""
    url = await legacy_at_head(make_database, 300_000)
    latencies: list[float] = []
    conn = await asyncpg.connect(url)
    try:
        run = await asyncio.to_thread(start_compaction, url)
        while run.poll() is None:
            now_us = int(time.time() * 1e6)
            started = time.perf_counter()
            await conn.execute(
                "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) "
                f"VALUES ('PROBEUSDT', {now_us}, {now_us})"
            )
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    out, err = await asyncio.to_thread(run.communicate)
    assert run.returncode == 0, err
    assert "swapped orderbook_data_history" in out
    assert len(latencies) > 20
    assert max(latencies) < 0.5, sorted(latencies)[-5:]


# -- other maintenance at the same time -----------------------------------------------------------


async def test_a_partition_pruned_while_it_is_compacted_is_left_to_prune(
    make_database: MakeDb, tmp_path: Path
) -> None:
    url = await at_head(make_database)
    async with engine_on(url) as engine:
        await partitions.ensure(
            engine, ahead=0, since=dt.date(2024, 2, 1), today=dt.date(2024, 2, 1)
        )
    await fill(url, 30_000, start=JAN_1_2024 + 31 * DAY_US, span=DAY_US)  # Feb 1
    before = await exact(url)
    run = await asyncio.to_thread(start_compaction, url)
    assert run.stdout is not None
    for line in run.stdout:  # paused right after its first sorted copy
        if line.startswith("built "):
            run.send_signal(signal.SIGSTOP)
            break
    try:
        async with engine_on(url) as engine:
            pruned = await partitions.prune(engine, dt.date(2024, 2, 2), archive_dir=tmp_path)
    finally:
        run.send_signal(signal.SIGCONT)
    out, err = await asyncio.to_thread(run.communicate)
    assert run.returncode == 0, err
    assert "skipped orderbook_data_p20240201" in out
    assert pruned.dropped == ["orderbook_data_p20240201"]
    assert pruned.rows == before[0]
    assert await leftovers(url) == []
    assert (await exact(url))[0] == 0


async def test_compactions_ensure_and_prune_at_once_take_turns(
    make_database: MakeDb, tmp_path: Path
) -> None:
    url = await at_head(make_database)
    async with engine_on(url) as engine:
        await partitions.ensure(
            engine, ahead=2, since=dt.date(2024, 1, 1), today=dt.date(2024, 2, 1)
        )
    await fill(url, 30_000)  # January
    await fill(url, 6_000, start=JAN_1_2024 + 31 * DAY_US, span=3 * DAY_US)  # Feb 1 to 3
    feb_1 = JAN_1_2024 + 31 * DAY_US
    february = await fetch(
        url, f"SELECT count(*), sum(id) FROM orderbook_data WHERE timestamp >= {feb_1}"
    )
    february_exact = await fetch(
        url,
        "SELECT md5(string_agg(o::text, ',' ORDER BY id)) FROM orderbook_data o "
        f"WHERE timestamp >= {feb_1}",
    )
    after_feb_3 = dt.datetime(2024, 2, 4, tzinfo=UTC)
    async with engine_on(url) as engine:
        first, second, _ensured, pruned = await asyncio.gather(
            compaction.compact(engine, now=after_feb_3),
            compaction.compact(engine, now=after_feb_3),
            partitions.ensure(engine, ahead=2),
            partitions.prune(engine, dt.date(2024, 2, 1), archive_dir=tmp_path),
        )
        listed = await partitions.list_partitions(engine)
    # January went to the archive, whole and once, whether compacted first or not
    assert pruned.rows == 30_000
    archived = pa.concat_tables(pq.read_table(path) for path in pruned.files)
    assert archived.num_rows == 30_000
    assert len(set(archived.column("id").to_pylist())) == 30_000
    # February was compacted once, by one of the two runs, and nothing else changed
    feb = {f"orderbook_data_p2024020{day}" for day in (1, 2, 3)}
    done = [name for run in (first, second) for c in run.compacted for name in c.partitions]
    assert feb <= set(done)
    assert len(done) == len(set(done))
    assert all(p.compacted_at is not None for p in listed if p.name in feb)
    assert await fetch(url, "SELECT count(*), sum(id) FROM orderbook_data") == february
    assert (
        await fetch(url, "SELECT md5(string_agg(o::text, ',' ORDER BY id)) FROM orderbook_data o")
        == february_exact
    )
    assert await leftovers(url) == []
