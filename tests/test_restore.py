"""Restore: archived rows back from the lake into PostgreSQL, exactly, and never twice.

Each test gets its own database, and runs on each lake of the shared ``lake`` fixture (a
local directory, and S3).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pandas as pd
import pandas.testing as pdt
import pytest
from test_archive import JAN_3, db_rows, entries, six_days
from test_partitions import DAY_US, JAN_1_2024, SYMBOLS, engine_on, fetch, where_rows_are

from orderbook_store.engine import create_engine
from orderbook_store.errors import ConfigError
from orderbook_store.files.lake_store import Lake
from orderbook_store.models import QUOTE_COLUMNS
from orderbook_store.ops import archive, partitions
from orderbook_store.ops.restore import RestoreError, restore
from orderbook_store.repository import OrderbookRepository

from catalog import execute
from lakes import LakeConfig

MakeDb = Callable[[], str]
JAN_2 = JAN_1_2024 + DAY_US
TWO_DAYS = (JAN_1_2024, JAN_1_2024 + 2 * DAY_US)


async def pruned_two_days(
    make_database: MakeDb, lake: Lake
) -> tuple[str, list[tuple[object, ...]]]:
    """Six days of quotes, the first two archived and pruned; returns the URL and their rows."""
    url = await six_days(make_database)
    before = await db_rows(url, *TWO_DAYS)
    async with engine_on(url) as engine:
        pruned = await partitions.prune(engine, JAN_3, lake=lake)
    assert pruned.rows == len(before) == 2_000
    assert await db_rows(url, *TWO_DAYS) == []
    return url, before


async def test_restore_is_exact_and_a_second_restore_adds_nothing(
    make_database: MakeDb, lake: Lake
) -> None:
    url, before = await pruned_two_days(make_database, lake)
    lines: list[str] = []
    async with engine_on(url) as engine:
        result = await restore(engine, lake, *TWO_DAYS, progress=lines.append)
        assert (result.rows_read, result.rows_added) == (2_000, 2_000)
        assert len(result.files) == 8
        assert result.ranges_back == [(JAN_1_2024, JAN_2), (JAN_2, JAN_1_2024 + 2 * DAY_US)]
        # every column as it was: ids and created_at too
        assert await db_rows(url, *TWO_DAYS) == before
        # into partitions of their own days, not the default one
        where = await where_rows_are(url)
        assert where["orderbook_data_p20240101"] == where["orderbook_data_p20240102"] == 1_000
        assert "orderbook_data_default" not in where
        assert all(e.dropped_at is None for e in await entries(url))

        again = await restore(engine, lake, *TWO_DAYS)
        assert (again.rows_read, again.rows_added, again.rows_skipped) == (2_000, 0, 2_000)
    assert await db_rows(url, *TWO_DAYS) == before
    assert sum(line.startswith("restored exchange=") for line in lines) == 8
    # the sequence goes on past every restored id, even when it was reset
    await execute(url, "ALTER SEQUENCE orderbook_data_id_seq RESTART WITH 1")
    async with engine_on(url) as engine:
        await execute(url, f"DELETE FROM orderbook_data WHERE timestamp < {JAN_2}")
        assert (await restore(engine, lake, *TWO_DAYS)).rows_added == 1_000
    await execute(
        url,
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) "
        f"VALUES ('BTCUSDT', {JAN_1_2024 + 1}, {JAN_1_2024 + 2})",
    )
    newest = await fetch(url, f"SELECT max(id) FROM orderbook_data WHERE timestamp < {JAN_2}")
    assert newest[0][0] == max(int(row[0]) for row in before) + 1  # type: ignore[call-overload]


async def quotes_of_two_days(url: str, lake_config: LakeConfig) -> pd.DataFrame:
    """Every quote of the two pruned days through ``repo.quotes``, reading across tiers."""
    engine = create_engine(lake_config.settings(database_url=url, pool_size=4))
    try:
        async with OrderbookRepository(engine) as repo:
            frame = await repo.quotes(SYMBOLS, *TWO_DAYS, columns=["id", *QUOTE_COLUMNS])
            assert isinstance(frame, pd.DataFrame)
            return frame
    finally:
        await engine.dispose()


async def test_restore_of_one_symbol_then_of_the_rest(
    make_database: MakeDb, lake: Lake, lake_config: LakeConfig
) -> None:
    url, before = await pruned_two_days(make_database, lake)
    read_before = await quotes_of_two_days(url, lake_config)
    assert len(read_before) == 2_000
    btc = [row for row in before if row[2] == "BTCUSDT"]
    async with engine_on(url) as engine:
        one = await restore(engine, lake, *TWO_DAYS, symbol="BTCUSDT")
        assert one.rows_added == len(btc) == 500
        assert await db_rows(url, *TWO_DAYS) == btc
        # the range is not back whole: reads take the rest from the lake, BTCUSDT from
        # PostgreSQL, and no row from both
        assert all(e.dropped_at is not None for e in await entries(url))
        assert all(len(e.restored_files) == 1 for e in await entries(url))
        pdt.assert_frame_equal(await quotes_of_two_days(url, lake_config), read_before)
        # the restored day cannot be archived over the lake's files: prune keeps it
        lines: list[str] = []
        kept = await partitions.prune(engine, JAN_3, lake=lake, progress=lines.append)
        assert kept.kept == ["orderbook_data_p20240101", "orderbook_data_p20240102"]
        assert kept.dropped == [] and any("restore --start" in line for line in lines)
        pdt.assert_frame_equal(await quotes_of_two_days(url, lake_config), read_before)
        rest = await restore(engine, lake, *TWO_DAYS)
    assert (rest.rows_read, rest.rows_added) == (1_500, 1_500)
    assert await db_rows(url, *TWO_DAYS) == before
    assert all(e.dropped_at is None and e.restored_files == [] for e in await entries(url))
    pdt.assert_frame_equal(await quotes_of_two_days(url, lake_config), read_before)
    # whole again: prune archives and drops it as any other day
    async with engine_on(url) as engine:
        again = await partitions.prune(engine, JAN_3, lake=lake)
    assert again.rows == 2_000 and again.kept == []
    pdt.assert_frame_equal(await quotes_of_two_days(url, lake_config), read_before)


async def test_part_of_a_day_of_a_dropped_range_is_refused(
    make_database: MakeDb, lake: Lake
) -> None:
    url, _before = await pruned_two_days(make_database, lake)
    hours = (JAN_1_2024 + 6 * 3_600_000_000, JAN_1_2024 + 30 * 3_600_000_000)  # Jan 1 6h-Jan 2 6h
    async with engine_on(url) as engine:
        with pytest.raises(RestoreError, match=r"covers only in part.*whole days.*Nothing was"):
            await restore(engine, lake, *hours)
    assert await db_rows(url, *TWO_DAYS) == []
    assert all(e.restored_files == [] for e in await entries(url))


async def test_restore_of_part_of_a_day_archived_and_still_stored(
    make_database: MakeDb, lake: Lake
) -> None:
    url = await six_days(make_database)
    before = await db_rows(url, *TWO_DAYS)
    hours = (JAN_1_2024 + 6 * 3_600_000_000, JAN_1_2024 + 30 * 3_600_000_000)  # Jan 1 6h-Jan 2 6h
    wanted = [row for row in before if hours[0] <= row[3] < hours[1]]  # type: ignore[operator]
    async with engine_on(url) as engine:
        await archive.archive(engine, lake, JAN_3)
        await execute(
            url,
            f"DELETE FROM orderbook_data WHERE timestamp >= {hours[0]} AND timestamp < {hours[1]}",
        )
        result = await restore(engine, lake, *hours)
    assert result.rows_added == len(wanted) == 1_000
    assert await db_rows(url, *TWO_DAYS) == before
    assert result.ranges_back == []


async def test_copies_of_one_quote_come_back_as_many_times_as_archived(
    make_database: MakeDb, lake: Lake
) -> None:
    url = await six_days(make_database, 600)
    # the same quote three times (a feed does repeat one); NULLs in it
    await execute(
        url,
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp, ask_price) "
        f"SELECT 'BTCUSDT', {JAN_1_2024 + 42}, {JAN_1_2024 + 43}, 7.5 FROM generate_series(1, 3)",
    )
    before = await db_rows(url, *TWO_DAYS)
    async with engine_on(url) as engine:
        await partitions.prune(engine, JAN_3, lake=lake)
        # one copy came back some other way (an import of an export, say): two more to add
        await partitions.ensure(
            engine, ahead=0, since=dt.date(2024, 1, 1), until=dt.date(2024, 1, 1)
        )
        await execute(
            url,
            "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp, ask_price) "
            f"VALUES ('BTCUSDT', {JAN_1_2024 + 42}, {JAN_1_2024 + 43}, 7.50)",
        )
        result = await restore(engine, lake, *TWO_DAYS)
    assert result.rows_added == len(before) - 1
    rows = await fetch(
        url,
        f"SELECT count(*) FROM orderbook_data WHERE timestamp = {JAN_1_2024 + 42}",
    )
    assert rows[0][0] == 3
    assert len(await db_rows(url, *TWO_DAYS)) == len(before)


async def test_late_rows_of_a_dropped_range_stay_beside_the_restored_ones(
    make_database: MakeDb, lake: Lake
) -> None:
    url, before = await pruned_two_days(make_database, lake)
    # a late quote for Jan 1 after the prune: into the default partition
    await execute(
        url,
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) "
        f"VALUES ('BTCUSDT', {JAN_1_2024 + 5}, {JAN_1_2024 + 6})",
    )
    assert (await where_rows_are(url)).get("orderbook_data_default") == 1
    async with engine_on(url) as engine:
        result = await restore(engine, lake, *TWO_DAYS)
    assert result.rows_added == 2_000
    rows = await db_rows(url, *TWO_DAYS)
    assert len(rows) == 2_001 and set(before) <= set(rows)
    assert "orderbook_data_default" not in await where_rows_are(url)


async def test_restore_of_a_range_never_archived_does_nothing(
    make_database: MakeDb, lake: Lake
) -> None:
    url = await six_days(make_database, 600)
    async with engine_on(url) as engine:
        result = await restore(engine, lake, *TWO_DAYS)
        assert (result.rows_read, result.rows_added) == (0, 0)
        with pytest.raises(ConfigError, match="end"):
            await restore(engine, lake, JAN_2, JAN_1_2024)
        await archive.archive(engine, lake, JAN_3)
        # archived, not pruned: every row is there already
        again = await restore(engine, lake, *TWO_DAYS)
    assert (again.rows_read, again.rows_added) == (200, 0)
