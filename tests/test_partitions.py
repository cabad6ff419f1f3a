"""Date partitioning: revision 0004 keeps every row, maintenance keeps partitions ahead and prunes.

Each test that needs a schema state of its own gets its own database (``make_database``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from orderbook_store.cli.partitions import app as partitions_app
from orderbook_store.engine import create_engine
from orderbook_store.files import lake_format
from orderbook_store.ops import lake_catalog, migrations, partitions
from orderbook_store.ops.archive import ArchiveError, archive, directory_lake
from orderbook_store.read.reader import Reader
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings

from catalog import ORIGINAL_DDL, execute, table_snapshot
from pgserver import TemporaryPostgres

MakeDb = Callable[[], str]

#: The newest revision: what a database upgraded without a target is at.
HEAD = migrations.head_revision()

PROJECT = Path(__file__).resolve().parent.parent
DAY_US = 86_400_000_000
JAN_1_2024 = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z, µs
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT")

#: n rows over 30 days from 2024-01-01, four symbols, made by the server (fast).
FILL_SQL = """
INSERT INTO orderbook_data
    (symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price, bid_amount, created_at)
SELECT (ARRAY['BTCUSDT', 'ETHUSDT', 'SOLUSDT', 'BNBUSDT'])[1 + g % 4],
       {start} + g::bigint * {span} / {n},
       {start} + g::bigint * {span} / {n} + 1500 + g % 997,
       round((random() * 10)::numeric, 8),
       round((40000 + random() * 100)::numeric, 1),
       round((39990 + random() * 100)::numeric, 1),
       CASE WHEN g % 101 = 0 THEN NULL ELSE round((random() * 10)::numeric, 8) END,
       timestamp '2024-02-01' + g * interval '1 millisecond'
FROM generate_series(0, {n} - 1) AS g
"""

#: Every value of every row, in id order, in one digest.
CHECKSUM_SQL = """
SELECT count(*), max(id), md5(string_agg(concat_ws('|', id, exchange, symbol, timestamp,
       local_timestamp, ask_amount, ask_price, bid_price, bid_amount, created_at), ','
       ORDER BY id))
FROM orderbook_data
"""


async def fill(url: str, n: int, *, start: int = JAN_1_2024, span: int = 30 * DAY_US) -> None:
    await execute(url, FILL_SQL.format(n=n, start=start, span=span))


async def fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def checksum(url: str) -> tuple[int, int, str]:
    row = (await fetch(url, CHECKSUM_SQL))[0]
    return row[0], row[1], row[2]


async def where_rows_are(url: str) -> dict[str, int]:
    """Partition name -> rows it holds."""
    rows = await fetch(
        url, "SELECT tableoid::regclass::text, count(*) FROM orderbook_data GROUP BY 1"
    )
    return {name: count for name, count in rows}


@asynccontextmanager
async def engine_on(url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=url, pool_size=4))
    try:
        yield engine
    finally:
        await engine.dispose()


async def at_head(make_database: MakeDb, revision: str = "head") -> str:
    """A new database at ``revision`` (made on a thread: the fixture runs its own loop)."""
    url = await asyncio.to_thread(make_database)
    migrations.upgrade(Settings(database_url=url), revision)
    return url


def quote(symbol: str, timestamp_us: int) -> dict[str, object]:
    return {
        "symbol": symbol,
        "timestamp": timestamp_us,
        "local_timestamp": timestamp_us + 2_000,
        "ask_amount": "1.5",
        "ask_price": "43000.1",
        "bid_price": "43000.0",
        "bid_amount": "2.25",
    }


# -- the upgrade ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_upgrade_of_a_million_rows_keeps_every_value_and_id(make_database: MakeDb) -> None:
    url = await at_head(make_database, "0003")
    settings = Settings(database_url=url)
    await fill(url, 1_000_000)
    await fetch(url, "ANALYZE orderbook_data")
    before = await checksum(url)
    day = (JAN_1_2024 + 9 * DAY_US, JAN_1_2024 + 10 * DAY_US)
    async with engine_on(url) as engine:
        read_before = await Reader(engine).quotes(["BTCUSDT", "SOLUSDT"], *day, exact=True)

    migrations.upgrade(settings, "0004")

    after = await checksum(url)
    assert after == before
    assert before[0] == 1_000_000
    kind = await fetch(
        url, "SELECT relkind::text FROM pg_class WHERE oid = 'orderbook_data'::regclass"
    )
    assert kind[0][0] == "p"
    # the old table became one partition holding every row; nothing sits in the default
    assert await where_rows_are(url) == {"orderbook_data_history": 1_000_000}
    indexes = await fetch(
        url, "SELECT indexname FROM pg_indexes WHERE tablename = 'orderbook_data'"
    )
    assert {r[0] for r in indexes} == {
        "orderbook_data_pkey",
        "idx_orderbook_symbol_timestamp",
        "idx_orderbook_created_at",
        "idx_orderbook_symbol",
    }
    # the old table's indexes were adopted under names of their own, not rebuilt
    history_indexes = await fetch(
        url, "SELECT indexname FROM pg_indexes WHERE tablename = 'orderbook_data_history'"
    )
    assert {r[0] for r in history_indexes} == {
        "orderbook_data_history_pkey",
        "idx_orderbook_symbol_timestamp_history",
        "idx_orderbook_created_at_history",
        "idx_orderbook_symbol_history",
    }
    pkey = await fetch(
        url,
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'orderbook_data'::regclass AND contype = 'p'",
    )
    assert pkey[0][0] == 'PRIMARY KEY (id, "timestamp")'

    async with engine_on(url) as engine:
        read_after = await Reader(engine).quotes(["BTCUSDT", "SOLUSDT"], *day, exact=True)
        assert len(read_after) > 10_000
        assert read_after.equals(read_before)

        # new rows get new ids from the same sequence
        async with OrderbookRepository(engine) as repo:
            await repo.add(quote("BTCUSDT", JAN_1_2024 + 5 * DAY_US + 1))
            await repo.add(quote("BTCUSDT", JAN_1_2024 + 400 * DAY_US))  # beyond every range
            await repo.flush()
    new_ids = await fetch(url, "SELECT id FROM orderbook_data WHERE id > 1000000 ORDER BY id")
    assert [r[0] for r in new_ids] == [1_000_001, 1_000_002]


INDEX_SHAPES_SQL = """
SELECT x.indexrelid::regclass::text, pg_get_indexdef(x.indexrelid)
FROM pg_index x JOIN pg_class t ON t.oid = x.indrelid
WHERE t.relname LIKE 'orderbook_data%' AND t.relname NOT LIKE 'orderbook_data_upgrade%'
ORDER BY 1
"""

SIZE_SQL = """
SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits
WHERE inhparent = 'orderbook_data'::regclass
"""


async def test_revision_0005_makes_the_indexes_leaner_and_its_downgrade_restores_them(
    make_database: MakeDb,
) -> None:
    url = await at_head(make_database, "0003")
    settings = Settings(database_url=url)
    await fill(url, 300_000)
    migrations.upgrade(settings, "0004")
    await execute(
        url,
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) "
        "SELECT 'BTCUSDT', (extract(epoch FROM now()) * 1000000)::bigint + g, 1 "
        "FROM generate_series(1, 1000) g",
    )  # rows in a daily partition too
    at_0004 = [tuple(r) for r in await fetch(url, INDEX_SHAPES_SQL)]
    before, size_before = await checksum(url), (await fetch(url, SIZE_SQL))[0][0]

    migrations.upgrade(settings, "0005")
    shapes = dict(tuple(r) for r in await fetch(url, INDEX_SHAPES_SQL))  # type: ignore[misc]
    assert not [
        name
        for name in shapes
        if name.startswith("idx_orderbook_symbol_") and "timestamp" not in name
    ]
    assert "idx_orderbook_symbol" not in shapes
    brins = {name for name, definition in shapes.items() if "USING brin (created_at)" in definition}
    partitions = await partitions_of(url)
    assert brins == {"idx_orderbook_created_at"} | {
        f"idx_orderbook_created_at_{p.name.removeprefix('orderbook_data_')}" for p in partitions
    }
    assert not [d for d in shapes.values() if "btree (created_at)" in d]
    assert await checksum(url) == before
    assert (await fetch(url, SIZE_SQL))[0][0] < size_before
    # Symbol-only lookups (the distinct-symbol skip scan) use the composite index.
    plan = await fetch(
        url,
        "EXPLAIN SELECT symbol FROM orderbook_data WHERE symbol > 'BNBUSDT' "
        "ORDER BY symbol, timestamp LIMIT 1",
    )
    text = "\n".join(r[0] for r in plan)
    assert "idx_orderbook_symbol_timestamp" in text and "Seq Scan" not in text

    migrations.downgrade(settings, "0004")
    assert [tuple(r) for r in await fetch(url, INDEX_SHAPES_SQL)] == at_0004
    assert await checksum(url) == before


#: What a revision makes besides columns and indexes: tables, functions and triggers.
SCHEMA_OBJECTS_SQL = """
SELECT 'table', c.relname::text, c.relkind::text FROM pg_class c
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
UNION ALL
SELECT 'function', p.proname::text, pg_get_function_identity_arguments(p.oid) FROM pg_proc p
WHERE p.pronamespace = current_schema()::regnamespace
UNION ALL
SELECT 'trigger', t.tgname::text, t.tgrelid::regclass::text FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
WHERE NOT t.tgisinternal AND c.relnamespace = current_schema()::regnamespace
ORDER BY 1, 2, 3
"""


def _revision_module(name: str) -> object:
    import importlib.util

    path = PROJECT / "orderbook_store" / "migrations" / "versions" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_revision_0006_lists_the_stored_symbols_and_its_downgrade_removes_the_list(
    make_database: MakeDb,
) -> None:
    url = await at_head(make_database, "0003")
    settings = Settings(database_url=url)
    await fill(url, 200_000)  # the history partition: four symbols
    migrations.upgrade(settings, "0005")
    await execute(
        url,
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) VALUES "
        "('DAYUSDT', (extract(epoch FROM now() + interval '2 days') * 1000000)::bigint, 1),"
        "('OLDUSDT', 1262304000000000, 1262304000000000),"  # the default partition
        "('BTCUSDT', 1262304000000001, 1262304000000001)",
    )
    assert set(await where_rows_are(url)) == {
        "orderbook_data_history",
        f"orderbook_data_p{dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2):%Y%m%d}",
        "orderbook_data_default",
    }
    at_0005 = [tuple(r) for r in await fetch(url, SCHEMA_OBJECTS_SQL)]
    shapes_0005 = [tuple(r) for r in await fetch(url, INDEX_SHAPES_SQL)]
    before = await checksum(url)
    assert "orderbook_symbols" not in {r[1] for r in at_0005}

    migrations.upgrade(settings, "0006")
    stored = [r[0] for r in await fetch(url, "SELECT DISTINCT symbol FROM orderbook_data")]
    listed = [r[0] for r in await fetch(url, "SELECT symbol FROM orderbook_symbols")]
    assert sorted(listed) == sorted(stored) == sorted([*SYMBOLS, "DAYUSDT", "OLDUSDT"])
    assert await checksum(url) == before
    # The fill is a skip scan of the partitions' indexes, never a scan of the rows.
    fill_sql = _revision_module("0006_known_symbols").FILL  # type: ignore[attr-defined]
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + fill_sql))
    finally:
        await conn.close()
    assert "Seq Scan on orderbook_data" not in plan and "idx_orderbook_symbol_timestamp" in plan

    migrations.downgrade(settings, "0005")
    assert [tuple(r) for r in await fetch(url, SCHEMA_OBJECTS_SQL)] == at_0005
    assert [tuple(r) for r in await fetch(url, INDEX_SHAPES_SQL)] == shapes_0005
    assert await checksum(url) == before
    await execute(  # inserts work without the trigger
        url,
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) "
        "VALUES ('NEWUSDT', 1704067200000001, 1)",
    )
    migrations.upgrade(settings, "head")
    listed = [r[0] for r in await fetch(url, "SELECT symbol FROM orderbook_symbols")]
    assert sorted(listed) == sorted([*SYMBOLS, "DAYUSDT", "NEWUSDT", "OLDUSDT"])


async def test_downgrade_to_the_plain_table_then_upgrade_again_loses_nothing(
    make_database: MakeDb,
) -> None:
    url = await at_head(make_database, "0003")
    settings = Settings(database_url=url)
    await fill(url, 50_000)
    migrations.upgrade(settings, "head")
    # rows in a daily partition (the history reaches to the upgrade's day at most, or the next
    # one within its last hour) and in the default partition too
    await execute(
        url,
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp, ask_price) VALUES "
        "('BTCUSDT', (extract(epoch FROM now() + interval '2 days') * 1000000)::bigint, "
        "1704067200000000, 1),"
        "('ETHUSDT', 1262304000000000, 1262304000000000, 2)",
    )
    in_two_days = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)
    assert set(await where_rows_are(url)) == {
        "orderbook_data_history",
        f"orderbook_data_p{in_two_days:%Y%m%d}",
        "orderbook_data_default",
    }
    at_head_sum = await checksum(url)

    migrations.downgrade(settings, "0003")
    assert await checksum(url) == at_head_sum
    by_hand = await asyncio.to_thread(make_database)
    await execute(by_hand, ORIGINAL_DDL)
    assert await table_snapshot(url) == await table_snapshot(by_hand)

    migrations.upgrade(settings, "head")
    assert await checksum(url) == at_head_sum
    await execute(
        url,
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) "
        "VALUES ('SOLUSDT', 1704067200000001, 1704067200000002)",
    )
    assert (await checksum(url))[1] == at_head_sum[1] + 1


async def test_upgrade_of_an_empty_table_makes_current_partitions_and_a_default(
    make_database: MakeDb,
) -> None:
    url = await at_head(make_database)
    found = await partitions_of(url)
    today = dt.datetime.now(dt.timezone.utc).date()
    names = [p.name for p in found]
    assert names[-1] == "orderbook_data_default"
    assert names[0] == f"orderbook_data_p{today:%Y%m%d}"
    assert len(names) == 1 + 8  # the current day and the next seven
    assert all(p.end_us - p.start_us == DAY_US for p in found[:-1])  # type: ignore[operator]


def test_weekly_period_is_chosen_at_upgrade_time(
    make_database: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_database()
    monkeypatch.setenv("DB_PARTITION_PERIOD", "week")
    migrations.upgrade(Settings(database_url=url), "head")
    found = asyncio.run(partitions_of(url))[:-1]
    assert found
    for part in found:
        assert part.start is not None and part.end is not None
        assert part.start.weekday() == 0  # Monday
        assert part.end - part.start == dt.timedelta(days=7)

    async def ensure() -> partitions.EnsureResult:
        async with engine_on(url) as engine:
            return await partitions.ensure(engine, ahead=10)

    result = asyncio.run(ensure())
    assert result.period == "week"
    assert len(result.created) == 3  # 8 made by the upgrade, 11 wanted now


def test_an_unknown_period_stops_the_upgrade_with_a_message(
    make_database: MakeDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_database()
    monkeypatch.setenv("DB_PARTITION_PERIOD", "fortnight")
    with pytest.raises(ValueError, match="fortnight"):
        migrations.upgrade(Settings(database_url=url), "head")


async def partitions_of(url: str) -> list[partitions.PartitionInfo]:
    async with engine_on(url) as engine:
        return await partitions.list_partitions(engine)


# -- routing and pruning ----------------------------------------------------------------------


async def test_one_day_query_plans_onto_one_partition(make_database: MakeDb) -> None:
    url = await at_head(make_database)
    async with engine_on(url) as engine:
        await partitions.ensure(engine, ahead=4, today=dt.date(2024, 1, 1))
    await fill(url, 5_000, span=5 * DAY_US)
    await fetch(url, "ANALYZE orderbook_data")
    lo, hi = JAN_1_2024 + 2 * DAY_US, JAN_1_2024 + 3 * DAY_US
    plan = "\n".join(
        r[0]
        for r in await fetch(
            url,
            "EXPLAIN SELECT * FROM orderbook_data WHERE symbol = 'BTCUSDT' "
            f"AND timestamp >= {lo} AND timestamp < {hi}",
        )
    )
    scanned = {word for word in plan.split() if word.startswith("orderbook_data_")}
    assert {s for s in scanned if not s.endswith("_idx")} == {"orderbook_data_p20240103"}, plan
    # the same holds with parameters (the reader's way), pruned at run time
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "SET plan_cache_mode = force_generic_plan; "
            "PREPARE day_query(text, bigint, bigint) AS SELECT * FROM orderbook_data "
            "WHERE symbol = $1 AND timestamp >= $2 AND timestamp < $3"
        )
        explained = await conn.fetch(
            f"EXPLAIN (ANALYZE, COSTS OFF) EXECUTE day_query('BTCUSDT', {lo}, {hi})"
        )
        generic = "\n".join(r[0] for r in explained)
    finally:
        await conn.close()
    # 5 days, 4 periods ahead of "today" in the test, 8 from the upgrade, the default: 1 left
    assert "Subplans Removed" in generic, generic
    assert generic.count("orderbook_data_p20240103") >= 1


async def test_writes_across_midnight_land_in_their_own_days(make_database: MakeDb) -> None:
    url = await at_head(make_database)
    midnight = JAN_1_2024 + DAY_US  # 2024-01-02T00:00:00Z
    async with engine_on(url) as engine:
        await partitions.ensure(engine, ahead=2, today=dt.date(2024, 1, 1))
        async with OrderbookRepository(engine) as repo:
            for offset in (-2, -1, 0, 1):
                await repo.add(quote("BTCUSDT", midnight + offset))
            await repo.flush()
    rows = await fetch(
        url,
        "SELECT timestamp - $1, tableoid::regclass::text FROM orderbook_data ORDER BY 1",
        midnight,
    )
    assert [tuple(r) for r in rows] == [
        (-2, "orderbook_data_p20240101"),
        (-1, "orderbook_data_p20240101"),
        (0, "orderbook_data_p20240102"),
        (1, "orderbook_data_p20240102"),
    ]


async def test_rows_outside_every_range_land_in_default_and_ensure_moves_them(
    make_database: MakeDb,
) -> None:
    url = await at_head(make_database)
    far_past = 1_561_939_200_000_000  # 2019-07-01
    far_future = 1_924_992_000_000_000  # 2031-01-01
    async with engine_on(url) as engine:
        async with OrderbookRepository(engine) as repo:  # no partition exists: still written
            for k in range(10):
                await repo.add(quote("ETHUSDT", far_past + k * 3_600_000_000))  # 10 hours
                await repo.add(quote("ETHUSDT", far_future + 7 * DAY_US + k))
            await repo.flush()
        before = await checksum(url)
        assert await where_rows_are(url) == {"orderbook_data_default": 20}

        result = await partitions.ensure(engine, ahead=0)
        assert result.moved_rows == 20
        assert {"orderbook_data_p20190701", "orderbook_data_p20310108"} <= set(result.created)
        assert await where_rows_are(url) == {
            "orderbook_data_p20190701": 10,
            "orderbook_data_p20310108": 10,
        }
        assert await checksum(url) == before  # same ids, same values
        again = await partitions.ensure(engine, ahead=0)
        assert (again.created, again.moved_rows) == ([], 0)


ENSURE_LOOP = """
import asyncio, datetime as dt, sys
from orderbook_store.ops import partitions
from orderbook_store.engine import create_engine
from orderbook_store.settings import Settings

async def main():
    engine = create_engine(Settings(pool_size=1))
    try:
        start = dt.date.fromisoformat(sys.argv[1])
        created = moved = 0
        for k in range(int(sys.argv[2])):
            done = await partitions.ensure(engine, ahead=1, today=start + dt.timedelta(days=k))
            created += len(done.created)
            moved += done.moved_rows
        print(created, moved)
    finally:
        await engine.dispose()

asyncio.run(main())
"""


@pytest.mark.slow
async def test_concurrent_ensure_while_a_writer_streams_loses_nothing(
    make_database: MakeDb,
) -> None:
    url = await at_head(make_database)
    env = {"DATABASE_URL": url, "PATH": "/usr/bin:/bin"}
    days = 20
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", ENSURE_LOOP, "2024-01-01", str(days)],
            cwd=PROJECT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    written = 0
    async with engine_on(url) as engine:
        async with OrderbookRepository(engine, batch_size=200, flush_interval_s=0.01) as repo:
            # Quotes over the days the two runs are creating, plus some no run will create:
            # every one must be stored once, in the default partition or a day's own.
            while any(run.poll() is None for run in runs) or written < 20_000:
                for k in range(200):
                    day = (written + k) % (days + 5)
                    await repo.add(quote(SYMBOLS[k % 4], JAN_1_2024 + day * DAY_US + written + k))
                written += 200
                await asyncio.sleep(0.005)
            await repo.flush()
        outputs = [run.communicate() for run in runs]
        assert [run.returncode for run in runs] == [0, 0], outputs
        totals = [tuple(map(int, out.split())) for out, _ in outputs]
        final = await partitions.ensure(engine, ahead=0, today=dt.date(2024, 1, 1))
        # each day's partition made exactly once by whoever came first (the runs took turns)
        assert sum(created for created, _ in totals) + len(final.created) == days + 5
        assert sum(moved for _, moved in totals) > 0  # rows were rehomed while writes went on

    stored = await fetch(
        url,
        "SELECT count(*), count(DISTINCT id), count(DISTINCT (symbol, timestamp)) "
        "FROM orderbook_data",
    )
    assert tuple(stored[0]) == (written, written, written)
    where = await where_rows_are(url)
    assert "orderbook_data_default" not in where
    assert len(where) == days + 5


async def test_prune_with_archive_keeps_exactly_the_pruned_rows_in_parquet(
    make_database: MakeDb, tmp_path: Path
) -> None:
    url = await at_head(make_database)
    async with engine_on(url) as engine:
        await partitions.ensure(engine, ahead=5, today=dt.date(2024, 1, 1))
    await fill(url, 6_000, span=6 * DAY_US)
    cutoff = JAN_1_2024 + 2 * DAY_US
    pruned = await fetch(
        url,
        "SELECT id, exchange, symbol, timestamp, local_timestamp, ask_amount, ask_price, "
        f"bid_price, bid_amount, created_at FROM orderbook_data WHERE timestamp < {cutoff} "
        "ORDER BY id",
    )
    kept = await fetch(
        url,
        f"SELECT md5(string_agg(o::text, ',' ORDER BY id)), count(*) FROM orderbook_data o "
        f"WHERE timestamp >= {cutoff}",
    )

    async with engine_on(url) as engine:
        result = await partitions.prune(engine, dt.date(2024, 1, 3), archive_dir=tmp_path)
        names = {p.name for p in await partitions.list_partitions(engine)}

    assert sorted(result.dropped) == ["orderbook_data_p20240101", "orderbook_data_p20240102"]
    assert result.rows == len(pruned) == 2_000
    assert not names & set(result.dropped)
    files = sorted(Path(p).relative_to(tmp_path).as_posix() for p in result.files)
    assert len(files) == 8  # four symbols, two days
    assert files[0] == (
        f"exchange=binance-futures/symbol=BNBUSDT/date=2024-01-01/"
        f"part-{JAN_1_2024}-{JAN_1_2024 + DAY_US}.parquet"
    )
    dataset = ds.dataset(
        tmp_path, format="parquet", partitioning=lake_format.partitioning()
    ).to_table()
    table = dataset.sort_by("id")
    for name in ("timestamp", "local_timestamp"):
        at = table.schema.get_field_index(name)
        table = table.set_column(at, name, table.column(name).cast(pa.int64()))
    assert table.num_rows == len(pruned)
    columns = list(pruned[0].keys())
    assert [tuple(row[c] for c in columns) for row in table.to_pylist()] == [
        tuple(r) for r in pruned
    ]
    assert table.schema.field("ask_price").type == pa.decimal128(20, 8)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    # the rest is untouched
    assert (
        await fetch(
            url,
            f"SELECT md5(string_agg(o::text, ',' ORDER BY id)), count(*) FROM orderbook_data o "
            f"WHERE timestamp >= {cutoff}",
        )
        == kept
    )
    assert (await fetch(url, f"SELECT count(*) FROM orderbook_data WHERE timestamp < {cutoff}"))[0][
        0
    ] == 0


async def test_prune_without_archive_requires_confirmation(make_database: MakeDb) -> None:
    url = await at_head(make_database)
    async with engine_on(url) as engine:
        await partitions.ensure(engine, ahead=1, today=dt.date(2024, 1, 1))
        await fill(url, 100, span=DAY_US)
        with pytest.raises(partitions.PartitionError, match="--yes"):
            await partitions.prune(engine, dt.date(2024, 1, 3))
        assert (await checksum(url))[0] == 100
        result = await partitions.prune(engine, dt.date(2024, 1, 3), confirm=True)
    assert result.dropped == ["orderbook_data_p20240101", "orderbook_data_p20240102"]
    assert result.rows == 100
    assert (await checksum(url))[0] == 0


def test_partitions_command_line(make_database: MakeDb, tmp_path: Path) -> None:
    url = make_database()
    migrations.upgrade(Settings(database_url=url), "head")
    runner = CliRunner()
    env = {"DATABASE_URL": url}

    listed = runner.invoke(partitions_app, ["list", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    assert '"name": "orderbook_data_default"' in listed.output

    ensured = runner.invoke(partitions_app, ["ensure", "--ahead", "10"], env=env)
    assert ensured.exit_code == 0, ensured.output
    assert "3 created" in ensured.output

    refused = runner.invoke(partitions_app, ["prune", "--older-than", "1d"], env=env)
    assert refused.exit_code == 2
    assert "--yes" in refused.output

    nothing = runner.invoke(
        partitions_app, ["prune", "--older-than", "90d", "--archive", str(tmp_path)], env=env
    )
    assert nothing.exit_code == 0, nothing.output
    assert "0 partitions dropped" in nothing.output

    table = runner.invoke(partitions_app, ["list"], env=env)
    assert table.exit_code == 0, table.output
    assert "default" in table.output


def test_maintenance_on_an_unpartitioned_table_says_to_upgrade(make_database: MakeDb) -> None:
    url = make_database()
    migrations.upgrade(Settings(database_url=url), "0003")

    async def run() -> None:
        async with engine_on(url) as engine:
            await partitions.ensure(engine)

    with pytest.raises(partitions.PartitionError, match="upgrade"):
        asyncio.run(run())


def test_period_arithmetic() -> None:
    d = dt.date(2024, 2, 29)  # a Thursday in a leap year
    assert partitions.period_start(d, "week") == dt.date(2024, 2, 26)
    assert partitions.period_start(d, "month") == dt.date(2024, 2, 1)
    assert partitions.next_period(dt.date(2024, 2, 1), "month") == dt.date(2024, 3, 1)
    assert partitions.next_period(dt.date(2024, 12, 1), "month") == dt.date(2025, 1, 1)
    assert partitions.to_us(dt.date(2024, 1, 1)) == JAN_1_2024
    assert partitions.day_of(JAN_1_2024 - 1) == dt.date(2023, 12, 31)


async def test_a_failed_archive_drops_nothing(make_database: MakeDb, tmp_path: Path) -> None:
    url = await at_head(make_database)
    async with engine_on(url) as engine:
        await partitions.ensure(engine, ahead=2, today=dt.date(2024, 1, 1))
        await fill(url, 3_000, span=3 * DAY_US)
        where = {f"orderbook_data_p2024010{day}": 1_000 for day in (1, 2, 3)}
        before = await checksum(url)
        not_a_directory = tmp_path / "file"
        not_a_directory.write_text("in the way")
        with pytest.raises(ArchiveError, match="cannot create"):
            await partitions.prune(engine, dt.date(2024, 1, 2), archive_dir=not_a_directory)
        assert await checksum(url) == before
        assert await where_rows_are(url) == where

        # archived; then a late quote of a new symbol, whose directory cannot be made
        lake = tmp_path / "lake"
        await archive(engine, directory_lake(lake), dt.date(2024, 1, 2))
        await execute(
            url,
            "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) "
            f"VALUES ('XRPUSDT', {JAN_1_2024 + 1}, {JAN_1_2024 + 2})",
        )
        (lake / "exchange=binance-futures" / "symbol=XRPUSDT").write_text("in the way")
        before = await checksum(url)
        with pytest.raises(ArchiveError, match="nothing was recorded"):
            await partitions.prune(engine, dt.date(2024, 1, 2), archive_dir=lake)
        assert await checksum(url) == before
        assert await where_rows_are(url) == where | {"orderbook_data_p20240101": 1_001}
        async with engine.connect() as conn:
            (entry,) = await lake_catalog.overlapping(conn, 0, 2**62)
        assert entry.dropped_at is None and entry.rows == 1_000


def test_period_from_the_alembic_command_line(make_database: MakeDb) -> None:
    url = make_database()
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-x", "period=month", "upgrade", "head"],
        cwd=PROJECT,
        env={"DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found = asyncio.run(partitions_of(url))[:-1]
    assert len(found) == 8
    for part in found:
        assert part.start is not None and part.end is not None
        assert part.start.day == 1 and part.end.day == 1
        assert 28 <= (part.end - part.start).days <= 31


async def test_upgrade_while_a_writer_streams_loses_nothing(make_database: MakeDb) -> None:
    """The collector keeps running through a deploy: it waits on the lock, it never fails."""
    url = await at_head(make_database, "0003")
    await fill(url, 100_000)
    added = 0
    async with (
        engine_on(url) as engine,
        OrderbookRepository(engine, batch_size=50, flush_interval_s=0.005) as repo,
    ):
        upgrading = asyncio.create_task(
            asyncio.to_thread(migrations.upgrade, Settings(database_url=url), "head")
        )
        while not upgrading.done() or added < 2_000:
            for k in range(20):
                # some into the old rows' range, some far outside it
                day = (added + k) % 40
                await repo.add(quote(SYMBOLS[k % 4], JAN_1_2024 + day * DAY_US + added + k))
            added += 20
            await asyncio.sleep(0.002)
        await upgrading
        await repo.flush()
    stored = await fetch(url, "SELECT count(*), count(DISTINCT id), max(id) FROM orderbook_data")
    assert tuple(stored[0]) == (100_000 + added, 100_000 + added, 100_000 + added)
    assert (await fetch(url, "SELECT version_num FROM alembic_version"))[0][0] == HEAD


async def timed_probe_insert(probe: asyncpg.Connection, waits: list[float]) -> None:
    """One insert of a PROBEUSDT row; how long it took is appended to ``waits``."""
    started = time.perf_counter()
    await probe.execute(
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) "
        "VALUES ('PROBEUSDT', $1, $1)",
        JAN_1_2024 + 5 * DAY_US + len(waits),
    )
    waits.append(time.perf_counter() - started)


@pytest.mark.slow
async def test_upgrade_of_millions_of_rows_never_stalls_a_writer_half_a_second(
    make_database: MakeDb,
) -> None:
    """The range is proven while writers carry on; the exclusive lock covers only renames
    and the attach. A probe inserts every 20 ms through the upgrade of a 6M-row table, whose
    validation alone takes over a second: no insert waits 0.5 s, and every row is there after."""
    url = await at_head(make_database, "0003")
    for month in range(2):  # at 6M rows the old upgrade held writers for over a second
        await fill(url, 3_000_000, start=JAN_1_2024 + month * 30 * DAY_US)
    await fetch(url, "ANALYZE orderbook_data")
    before = (await fetch(url, "SELECT count(*), sum(id) FROM orderbook_data"))[0]
    probe = await asyncpg.connect(url)
    waits: list[float] = []
    try:
        upgrading = asyncio.create_task(
            asyncio.to_thread(migrations.upgrade, Settings(database_url=url), "head")
        )
        while not upgrading.done():
            await timed_probe_insert(probe, waits)
            await asyncio.sleep(0.02)
        await upgrading
    finally:
        await probe.close()
    assert len(waits) > 20, "the upgrade was too quick to tell"
    assert max(waits) < 0.5, f"a writer waited {max(waits):.2f} s"
    after = await fetch(
        url, "SELECT count(*), sum(id) FROM orderbook_data WHERE symbol <> 'PROBEUSDT'"
    )
    assert tuple(after[0]) == tuple(before)
    probes = await fetch(url, "SELECT count(*) FROM orderbook_data WHERE symbol = 'PROBEUSDT'")
    assert probes[0][0] == len(waits)
    assert (await fetch(url, "SELECT version_num FROM alembic_version"))[0][0] == HEAD


@pytest.mark.parametrize("start", ["0003", "0004"])
async def test_a_long_reader_during_an_upgrade_never_stalls_a_writer(
    make_database: MakeDb, start: str
) -> None:
    """A notebook's read holds the table for seconds just as the upgrade needs it to itself:
    the upgrade asks for the lock in short attempts, so inserts never queue behind its request
    for long, and it finishes once the reader is done."""
    url = await at_head(make_database, start)
    await fill(url, 50_000)
    reader = await asyncpg.connect(url)
    probe = await asyncpg.connect(url)
    waits: list[float] = []
    try:
        await reader.execute("BEGIN; SELECT count(*) FROM orderbook_data")
        upgrading = asyncio.create_task(
            asyncio.to_thread(migrations.upgrade, Settings(database_url=url), "head")
        )
        held_until = time.monotonic() + 3
        while not upgrading.done():
            if reader is not None and time.monotonic() > held_until:
                await reader.execute("COMMIT")
                await reader.close()
                reader = None
            await timed_probe_insert(probe, waits)
            await asyncio.sleep(0.02)
        await upgrading
    finally:
        await probe.close()
        if reader is not None:
            await reader.close()
    assert reader is None, "the upgrade finished while the reader still held the table"
    assert max(waits) < 0.5, f"a writer waited {max(waits):.2f} s"
    probes = await fetch(url, "SELECT count(*) FROM orderbook_data WHERE symbol = 'PROBEUSDT'")
    assert probes[0][0] == len(waits)
    assert (await fetch(url, "SELECT version_num FROM alembic_version"))[0][0] == HEAD


async def test_a_long_reader_during_a_prune_never_stalls_a_writer(make_database: MakeDb) -> None:
    """The daily prune detaches old days while a notebook's read holds the table: the detach
    asks for the lock in short attempts, so inserts never queue behind it for long, and the
    days are dropped once the reader is done."""
    url = await at_head(make_database)
    async with engine_on(url) as engine:
        await partitions.ensure(engine, ahead=5, today=dt.date(2024, 1, 1))
    await fill(url, 6_000, span=6 * DAY_US)
    reader = await asyncpg.connect(url)
    probe = await asyncpg.connect(url)
    waits: list[float] = []
    lines: list[str] = []

    async def read_for_3_s() -> None:
        await reader.execute("BEGIN; SELECT count(*) FROM orderbook_data")
        await asyncio.sleep(3)
        await reader.execute("COMMIT")

    try:
        reading = asyncio.create_task(read_for_3_s())
        await asyncio.sleep(0.2)
        async with engine_on(url) as engine:
            pruning = asyncio.create_task(
                partitions.prune(engine, dt.date(2024, 1, 3), confirm=True, progress=lines.append)
            )
            while not pruning.done():
                await timed_probe_insert(probe, waits)
                await asyncio.sleep(0.02)
            result = await pruning
            assert reading.done(), "the prune finished while the reader still held the table"
    finally:
        await probe.close()
        await reader.close()
    assert max(waits) < 0.5, f"a writer waited {max(waits):.2f} s"
    assert result.dropped == ["orderbook_data_p20240101", "orderbook_data_p20240102"]
    assert result.rows == 2_000
    assert any("waiting for other sessions" in line for line in lines)
    probes = await fetch(url, "SELECT count(*) FROM orderbook_data WHERE symbol = 'PROBEUSDT'")
    assert probes[0][0] == len(waits)


async def test_ensure_since_prepares_partitions_for_a_backfill(make_database: MakeDb) -> None:
    url = await at_head(make_database)
    async with engine_on(url) as engine:
        result = await partitions.ensure(
            engine, ahead=1, today=dt.date(2024, 1, 10), since=dt.date(2023, 12, 30)
        )
        assert result.created == [
            f"orderbook_data_p{day:%Y%m%d}"
            for day in (dt.date(2023, 12, 30) + dt.timedelta(days=k) for k in range(13))
        ]
        await fill(url, 1_000, span=10 * DAY_US)  # the backfill goes straight to its days
        assert "orderbook_data_default" not in await where_rows_are(url)


@pytest.mark.fault
def test_ensure_since_years_back_fits_a_small_shared_lock_table() -> None:
    """Each new partition holds its locks until commit: two years of days in one transaction
    run a server with a small lock table out of shared memory; ensure takes them in batches."""
    small = {"max_connections": "10", "max_locks_per_transaction": "10"}
    with TemporaryPostgres(extra_conf=small) as server:
        server.create_database("quotes")
        settings = server.settings("quotes", pool_size=1)
        migrations.upgrade(settings, "head")
        today = dt.date(2024, 6, 1)

        async def ensure_since(days: int) -> list[str]:
            async with engine_on(server.url("quotes")) as engine:
                result = await partitions.ensure(
                    engine, ahead=0, today=today, since=today - dt.timedelta(days=days)
                )
                return result.created

        created = asyncio.run(ensure_since(730))
        assert len(created) > 2 * partitions.CREATE_BATCH
        listed = asyncio.run(partitions_of(server.url("quotes")))
        days = {part.start.date() for part in listed if part.start is not None}
        assert {today - dt.timedelta(days=k) for k in range(731)} <= days
        assert asyncio.run(ensure_since(730)) == []


async def test_switching_to_monthly_fills_only_the_gaps_between_daily_partitions(
    make_database: MakeDb,
) -> None:
    url = await at_head(make_database)
    async with engine_on(url) as engine:
        await partitions.ensure(engine, ahead=2, today=dt.date(2024, 1, 30))  # Jan 30 .. Feb 1
        result = await partitions.ensure(
            engine, ahead=1, period="month", today=dt.date(2024, 1, 15)
        )
        found = [
            (p.start, p.end)
            for p in await partitions.list_partitions(engine)
            if p.end is not None and p.end.year == 2024
        ]
    assert result.period == "month"
    day = dt.timedelta(days=1)
    utc = dt.timezone.utc
    jan1, jan30, feb1 = (dt.datetime(2024, m, d, tzinfo=utc) for m, d in ((1, 1), (1, 30), (2, 1)))
    assert found == [
        (jan1, jan30),  # January up to the daily partitions
        (jan30, jan30 + day),
        (jan30 + day, feb1),
        (feb1, feb1 + day),
        (feb1 + day, dt.datetime(2024, 3, 1, tzinfo=utc)),  # the rest of February
    ]
