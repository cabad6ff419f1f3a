"""latest(), asof() and the quote in force on daily partitions: the plain table's answers, by
index probes into a few partitions, never a sequential scan.

Each case gets its own database: a plain table (revision 0003), or the head revision with 30 or
365 daily partitions from 2024-01-01 (plus the upgrade's partitions around today and the default
partition). The answers are checked against a brute-force reading of every row.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import asyncpg
import pandas as pd
import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.engine import create_engine
from orderbook_store.files.importers.pipeline import import_paths
from orderbook_store.ops import compaction, migrations, partitions, symbols
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings

MakeDb = Callable[[], str]

DAY_US = 86_400_000_000
START = dt.date(2024, 1, 1)
T0 = partitions.to_us(START)
PER_DAY = 40  # rows per symbol per day
Y2020 = partitions.to_us(dt.date(2020, 2, 22))  # no partition: the default one
Y2031 = partitions.to_us(dt.date(2031, 6, 1))  # no partition: the default one

#: BTC, ETH and SOL on every day; OLDUSDT only on the first day; DEFUSDT only before every
#: partition; BTCUSDT's last quote after every partition; ETHUSDT's last two quotes tie on
#: time; XRPUSDT only today (a partition the upgrade made). local_timestamp = timestamp + id,
#: so a frame shows which row was picked.
FILL_SQL = """
INSERT INTO orderbook_data
    (symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price, bid_amount)
SELECT s.symbol, {t0} + d::bigint * {day} + (g::bigint * 7919 % 86400) * 1000000 + 17,
       0, 1.5, 43000.1, 43000.0, 2.25
FROM generate_series(0, {days} - 1) AS d, generate_series(0, {per_day} - 1) AS g,
     (VALUES ('BTCUSDT'), ('ETHUSDT'), ('SOLUSDT')) AS s(symbol);
INSERT INTO orderbook_data
    (symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price, bid_amount)
VALUES ('OLDUSDT', {t0} + 5, 0, 1, 2, 1, 1),
       ('DEFUSDT', {y2020}, 0, 1, 2, 1, 1), ('DEFUSDT', {y2020} + 9, 0, 1, 2, 1, 1),
       ('BTCUSDT', {y2031}, 0, 1, 2, 1, 1),
       ('ETHUSDT', {t0} + {days}::bigint * {day} - 1, 0, 1, 2, 1, 1),
       ('ETHUSDT', {t0} + {days}::bigint * {day} - 1, 0, 1, 2, 1, 1),
       ('XRPUSDT', (extract(epoch FROM now()) * 1000000)::bigint, 0, 1, 2, 1, 1);
UPDATE orderbook_data SET local_timestamp = timestamp + id;
ANALYZE orderbook_data;
"""

SYMBOLS = ["BTCUSDT", "DEFUSDT", "ETHUSDT", "OLDUSDT", "SOLUSDT", "XRPUSDT"]


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _every_row(url: str) -> list[tuple[str, int, int]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT symbol, timestamp, id FROM orderbook_data")
    finally:
        await conn.close()
    return [(r["symbol"], r["timestamp"], r["id"]) for r in rows]


async def _database(make_database: MakeDb, days: int | None, *, span: int | None = None) -> str:
    """A filled database: a plain table (``days=None``) or ``days`` daily partitions; the
    fill spans ``span`` days (``days``, or 30 for the plain table)."""
    url = await asyncio.to_thread(make_database)
    settings = Settings(database_url=url, pool_size=2)
    await asyncio.to_thread(migrations.upgrade, settings, "0003" if days is None else "head")
    if days is not None:
        engine = create_engine(settings)
        try:
            await partitions.ensure(engine, ahead=days - 1, today=START)
        finally:
            await engine.dispose()
    if span is None:
        span = 30 if days is None else days
    await _execute(
        url,
        FILL_SQL.format(t0=T0, day=DAY_US, days=span, per_day=PER_DAY, y2020=Y2020, y2031=Y2031),
    )
    return url


@asynccontextmanager
async def _logging_engine(
    url: str,
) -> AsyncIterator[tuple[AsyncEngine, list[asyncpg.LoggedQuery]]]:
    """An engine whose connections record every statement they send."""
    engine = create_engine(Settings(database_url=url, pool_size=2))
    logged: list[asyncpg.LoggedQuery] = []

    @event.listens_for(engine.sync_engine, "connect")
    def _record(dbapi_connection: object, _record: object) -> None:
        dbapi_connection.driver_connection.add_query_logger(logged.append)  # type: ignore

    try:
        yield engine, logged
    finally:
        await engine.dispose()


def _last(rows: list[tuple[str, int, int]], upper: int | None = None) -> dict[str, tuple[int, int]]:
    """symbol -> (timestamp, id) of its last row at or before ``upper``: by brute force."""
    best: dict[str, tuple[int, int]] = {}
    for symbol, timestamp, row_id in rows:
        if upper is not None and timestamp > upper:
            continue
        if symbol not in best or (timestamp, row_id) > best[symbol]:
            best[symbol] = (timestamp, row_id)
    return best


def _picked(frame: pd.DataFrame) -> list[tuple[str, int, int]]:
    """(symbol, timestamp, id) of each row of a latest() frame (id = local - timestamp)."""
    stamps = frame["timestamp"].astype("int64").tolist()
    local = frame["local_timestamp"].astype("int64").tolist()
    return [(s, t, lt - t) for s, t, lt in zip(frame["symbol"], stamps, local, strict=True)]


async def _replay_plans(url: str, logged: list[asyncpg.LoggedQuery]) -> list[str]:
    """EXPLAIN of every probe statement the reader sent, replayed in one transaction with the
    settings the reader's own statements made (its LOCK/SET LOCAL lines)."""
    plans = []
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            for entry in logged:
                query = entry.query.lstrip()
                if query.startswith("LOCK"):
                    await conn.execute(query)
                elif query.startswith(("SELECT", "WITH", "(WITH")) and "orderbook_data" in query:
                    rows = await conn.fetch("EXPLAIN " + query, *entry.args)
                    plans.append("\n".join(r[0] for r in rows))
    finally:
        await conn.close()
    return plans


def _partitions_named(plans: list[str]) -> set[str]:
    words = " ".join(plans).replace('"', " ").split()
    return {w for w in words if w.startswith("orderbook_data_p")}


@pytest.mark.parametrize("days", [None, 30, pytest.param(365, marks=pytest.mark.slow)])
async def test_latest_and_asof_match_a_brute_force_answer(
    make_database: MakeDb, days: int | None
) -> None:
    url = await _database(make_database, days)
    rows = await _every_row(url)
    expected = _last(rows)
    async with _logging_engine(url) as (engine, logged), OrderbookRepository(engine) as repo:
        every = await repo.latest()
        assert _picked(every) == [(s, *expected[s]) for s in SYMBOLS]
        some = await repo.latest(["XRPUSDT", "OLDUSDT", "NOSUCH", "DEFUSDT", "BTCUSDT"])
        named = ["BTCUSDT", "DEFUSDT", "OLDUSDT", "XRPUSDT"]
        assert _picked(some) == [(s, *expected[s]) for s in named]

        last_day = T0 + (30 if days is None else days) * DAY_US
        times = [
            Y2020 - 1,  # before every quote
            Y2020 + 9,  # an exact hit, in the default partition
            T0 - 1,  # between the default partition's rows and the first partition
            T0 + 5,
            T0 + 3 * DAY_US + 17,  # an exact hit, a day's first quote
            T0 + 3 * DAY_US - 1,  # the last microsecond of a day
            last_day - 1,  # the tie
            last_day + 10 * DAY_US,  # after the partitions of the fill
            Y2031 + 1,
        ]
        for symbol in ("BTCUSDT", "ETHUSDT", "OLDUSDT", "DEFUSDT"):
            frame = await repo.asof(symbol, times)
            got = frame["timestamp"].tolist()
            for time_us, stamp in zip(times, got, strict=True):
                want = _last(rows, time_us).get(symbol)
                if want is None:
                    assert pd.isna(stamp), (symbol, time_us)
                else:
                    assert int(pd.Timestamp(stamp).value // 1000) == want[0], (symbol, time_us)
            local = frame["local_timestamp"].tolist()
            ids = [
                None if pd.isna(s) else int(lt.value // 1000) - int(s.value // 1000)
                for s, lt in zip(got, local, strict=True)
            ]
            assert ids == [
                None if (w := _last(rows, t).get(symbol)) is None else w[1] for t in times
            ]

        # Many times: one range read from the quote in force at the earliest time.
        repo._read_path.asof_range_min_times = 3
        many = [T0 + DAY_US, T0 + DAY_US + 5_000_000, T0 + 2 * DAY_US]
        ranged = await repo.asof("SOLUSDT", many)
        want = [_last(rows, t)["SOLUSDT"][0] for t in many]
        assert [int(s.value // 1000) for s in ranged["timestamp"]] == want

    plans = await _replay_plans(url, logged)
    assert plans
    for plan in plans:
        assert "Seq Scan on orderbook_data" not in plan, plan
    if days is not None:
        assert _partitions_named(plans), "the probes named no partition"


@pytest.mark.slow
async def test_latest_of_one_symbol_asks_a_few_partitions_of_365(make_database: MakeDb) -> None:
    url = await _database(make_database, 365)
    async with _logging_engine(url) as (engine, logged), OrderbookRepository(engine) as repo:
        frame = await repo.latest("SOLUSDT")
        assert frame["symbol"].tolist() == ["SOLUSDT"]
        asked = _partitions_named(await _replay_plans(url, logged))
        # The partitions made around today, then the newest days of the fill: not all 365.
        assert len(asked) < 30, sorted(asked)
        assert f"orderbook_data_p{START + dt.timedelta(days=364):%Y%m%d}" in asked
        assert f"orderbook_data_p{START:%Y%m%d}" not in asked


# -- latest() of every symbol: the listed symbols (revision 0006) ------------------------------

#: A symbol stored only on the fill's first day: gone with that day's partition.
GONE_SQL = f"""
INSERT INTO orderbook_data
    (symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price, bid_amount)
VALUES ('GONEUSDT', {T0} + 11, {T0} + 12, 1, 2, 1, 1);
"""


async def _twins(make_database: MakeDb, days: int) -> tuple[str, str]:
    """The same rows, ids included, in ``days`` daily partitions and in a plain table."""
    parted = await _database(make_database, days)
    plain = await _database(make_database, None, span=days)
    conn = await asyncpg.connect(parted)
    try:
        xrp = await conn.fetchrow(
            "SELECT timestamp, id FROM orderbook_data WHERE symbol = 'XRPUSDT'"
        )
    finally:
        await conn.close()
    # XRPUSDT's quote is stamped now(): the same moment in both.
    await _execute(
        plain,
        f"UPDATE orderbook_data SET timestamp = {xrp['timestamp']},"
        f" local_timestamp = {xrp['timestamp'] + xrp['id']} WHERE symbol = 'XRPUSDT'",
    )
    for url in (parted, plain):
        await _execute(url, GONE_SQL)
    return parted, plain


async def _latest(url: str) -> pd.DataFrame:
    engine = create_engine(Settings(database_url=url, pool_size=2))
    try:
        async with OrderbookRepository(engine) as repo:
            return await repo.latest(exact=True)
    finally:
        await engine.dispose()


async def _listed(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT symbol FROM orderbook_symbols ORDER BY symbol")
    finally:
        await conn.close()
    return [r["symbol"] for r in rows]


@pytest.mark.parametrize("days", [30, pytest.param(365, marks=pytest.mark.slow)])
async def test_latest_of_every_symbol_is_the_plain_tables_answer(
    make_database: MakeDb, days: int
) -> None:
    parted, plain = await _twins(make_database, days)
    assert await _listed(parted) == sorted([*SYMBOLS, "GONEUSDT"])
    expected = await _latest(plain)
    assert expected["symbol"].tolist() == sorted([*SYMBOLS, "GONEUSDT"])
    got = await _latest(parted)
    pd.testing.assert_frame_equal(got, expected)

    # The first day pruned (OLDUSDT and GONEUSDT were stored only then); the plain table
    # loses the same rows.
    engine = create_engine(Settings(database_url=parted, pool_size=2))
    try:
        pruned = await partitions.prune(engine, START + dt.timedelta(days=1), confirm=True)
    finally:
        await engine.dispose()
    assert pruned.dropped == [f"orderbook_data_p{START:%Y%m%d}"]
    await _execute(
        plain, f"DELETE FROM orderbook_data WHERE timestamp >= {T0} AND timestamp < {T0 + DAY_US}"
    )
    assert pruned.forgotten == ["GONEUSDT", "OLDUSDT"]
    assert await _listed(parted) == [s for s in SYMBOLS if s != "OLDUSDT"]
    expected = await _latest(plain)
    assert "GONEUSDT" not in expected["symbol"].tolist()
    assert "OLDUSDT" not in expected["symbol"].tolist()
    pd.testing.assert_frame_equal(await _latest(parted), expected)
    # A symbol listed but not stored (its partitions dropped by hand) yields nothing.
    await _execute(parted, "INSERT INTO orderbook_symbols VALUES ('GHOSTUSDT')")
    pd.testing.assert_frame_equal(await _latest(parted), expected)


async def test_forgetting_unstored_symbols_waits_for_a_writer_storing_one_again(
    make_database: MakeDb,
) -> None:
    url = await _database(make_database, 30)
    await _execute(url, "INSERT INTO orderbook_symbols VALUES ('GHOSTUSDT'), ('GONEUSDT')")
    writer = await asyncpg.connect(url)
    engine = create_engine(Settings(database_url=url, pool_size=2))
    try:
        storing = writer.transaction()
        await storing.start()
        await writer.execute(
            "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp)"
            f" VALUES ('GHOSTUSDT', {T0 + 5 * DAY_US}, 0)"
        )  # the trigger found GHOSTUSDT listed: nothing to add
        forgetting = asyncio.create_task(symbols.forget_unstored_symbols(engine))
        await asyncio.sleep(0.3)
        assert not forgetting.done()  # waits for the writer's transaction
        await storing.commit()
        assert await asyncio.wait_for(forgetting, 10) == ["GONEUSDT"]
    finally:
        await writer.close()
        await engine.dispose()
    assert await _listed(url) == sorted([*SYMBOLS, "GHOSTUSDT"])


@pytest.mark.slow
async def test_latest_of_every_symbol_probes_a_few_partitions_of_365(
    make_database: MakeDb,
) -> None:
    url = await _database(make_database, 365)
    async with _logging_engine(url) as (engine, logged), OrderbookRepository(engine) as repo:
        frame = await repo.latest()
        assert frame["symbol"].tolist() == SYMBOLS
    sent = [entry.query for entry in logged]
    skip_scans = [q for q in sent if "RECURSIVE" in q and "orderbook_data" in q]
    assert not skip_scans, "a skip scan of the partitions ran"
    plans = await _replay_plans(url, logged)
    for plan in plans:
        assert "Seq Scan on orderbook_data" not in plan, plan
    asked = _partitions_named(plans)
    # OLDUSDT is found only on the first day, so the walk reaches it; but each partition is
    # asked in one round, not once per symbol and partition as the skip scan did.
    assert len(asked) == 365 + 8
    assert f"orderbook_data_p{START + dt.timedelta(days=364):%Y%m%d}" in asked
    statements = [q for q in sent if "orderbook_data" in q and "LATERAL" in q]
    # Rounds: the current and ahead partitions, then windows of 1, 2, 4... back to the first day.
    assert len(statements) <= 2 + (365).bit_length(), len(statements)


async def test_a_new_symbol_is_listed_by_the_writer_and_by_an_import(
    make_database: MakeDb, tmp_path: Path
) -> None:
    url = await _database(make_database, 30)
    settings = Settings(database_url=url, pool_size=2, spool_dir=tmp_path / "spool")
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine) as repo:
            await repo.add(
                {
                    "symbol": "NEWUSDT",
                    "timestamp": T0 + 7 * DAY_US + 3,
                    "local_timestamp": T0 + 7 * DAY_US + 4,
                    "ask_amount": "1",
                    "ask_price": "2.5",
                    "bid_price": "2.4",
                    "bid_amount": "3",
                }
            )
            await repo.flush()
            frame = await repo.latest(exact=True)
            assert frame["symbol"].tolist() == sorted([*SYMBOLS, "NEWUSDT"])
            new = frame[frame["symbol"] == "NEWUSDT"]
            assert new["ask_price"].tolist() == [Decimal("2.50000000")]

            path = tmp_path / "IMPUSDT-bookTicker-2024-01-09.csv"
            path.write_text(
                "update_id,best_bid_price,best_bid_qty,best_ask_price,best_ask_qty,"
                "transaction_time,event_time\n"
                f"1,10.5,1,10.6,2,{(T0 + 8 * DAY_US) // 1000},{(T0 + 8 * DAY_US) // 1000 + 1}\n"
                f"2,10.4,1,10.7,2,{(T0 + 8 * DAY_US) // 1000 + 5},{(T0 + 8 * DAY_US) // 1000 + 6}\n"
            )
            summary = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")
            assert summary.rows == 2, summary
            frame = await repo.latest(exact=True)
            assert frame["symbol"].tolist() == sorted([*SYMBOLS, "IMPUSDT", "NEWUSDT"])
            imported = frame[frame["symbol"] == "IMPUSDT"]
            assert imported["bid_price"].tolist() == [Decimal("10.40000000")]
    finally:
        await engine.dispose()
    assert await _listed(url) == sorted([*SYMBOLS, "IMPUSDT", "NEWUSDT"])


async def test_two_writers_of_a_new_symbol_at_once_list_it_once(make_database: MakeDb) -> None:
    url = await _database(make_database, 30)
    insert = (
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp)"
        f" VALUES ('BOTHUSDT', {T0} + $1::bigint, 0)"
    )
    first, second = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        one = first.transaction()
        await one.start()
        await first.execute(insert.replace("$1::bigint", "1"))
        two = second.transaction()
        await two.start()
        # The second waits for the first's commit (its listing of BOTHUSDT), then goes on.
        waiting = asyncio.create_task(second.execute(insert.replace("$1::bigint", "2")))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await one.commit()
        await asyncio.wait_for(waiting, 10)
        await two.commit()
    finally:
        await first.close()
        await second.close()
    assert (await _listed(url)).count("BOTHUSDT") == 1
    conn = await asyncpg.connect(url)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM orderbook_data WHERE symbol = 'BOTHUSDT'"
        )
    finally:
        await conn.close()
    assert stored == 2


async def test_compacted_days_keep_latest_and_still_list_a_new_symbol(
    make_database: MakeDb,
) -> None:
    """Compaction moves rows into new partitions without the parent's trigger: their symbols
    are listed already, and a later insert into a compacted day lists a new one."""
    url = await _database(make_database, 30)
    before = await _latest(url)
    engine = create_engine(Settings(database_url=url, pool_size=2))
    try:
        result = await compaction.compact(
            engine, now=dt.datetime(2024, 1, 5, tzinfo=dt.timezone.utc)
        )
    finally:
        await engine.dispose()
    assert [c.source for c in result.compacted] == [
        f"orderbook_data_p{START + dt.timedelta(days=d):%Y%m%d}" for d in range(4)
    ]
    pd.testing.assert_frame_equal(await _latest(url), before)
    await _execute(
        url,
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp)"
        f" VALUES ('LATEUSDT', {T0 + DAY_US + 1}, 0)",
    )
    assert "LATEUSDT" in await _listed(url)
    assert "LATEUSDT" in (await _latest(url))["symbol"].tolist()
