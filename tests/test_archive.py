"""Archiving to the lake: every row of a closed partition in its files, verified, recorded once.

Each test gets its own database (``make_database``) and runs on each lake of the shared
``lake`` fixture (``tests/lakes.py``: a local directory and a bucket on the S3 server the tests
start). The killed run is a separate process, killed as an operator's ^C or an OOM would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from test_partitions import DAY_US, JAN_1_2024, at_head, engine_on, fetch, fill

from orderbook_store.files.export import export_parquet
from orderbook_store.files.lake_checksum import Totals, checksum_sql, table_totals, totals_sql
from orderbook_store.files.lake_format import FILE_COLUMNS, partitioning
from orderbook_store.files.lake_store import Lake
from orderbook_store.ops import archive, lake_catalog, partitions

from catalog import execute
from lakes import LakeConfig

MakeDb = Callable[[], str]
PROJECT = Path(__file__).resolve().parent.parent
UTC = dt.timezone.utc
JAN_3 = dt.date(2024, 1, 3)

#: Every column of every row in id order: the exact multiset the lake must hold.
ROWS_SQL = """
SELECT id, exchange, symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price,
       bid_amount, created_at
FROM orderbook_data WHERE timestamp >= $1 AND timestamp < $2 ORDER BY id
"""


async def six_days(make_database: MakeDb, rows: int = 6_000) -> str:
    """A database with day partitions from 2024-01-01 and ``rows`` quotes over six days."""
    url = await at_head(make_database)
    async with engine_on(url) as engine:
        await partitions.ensure(engine, ahead=5, today=dt.date(2024, 1, 1))
    await fill(url, rows, span=6 * DAY_US)
    return url


def lake_rows(lake: Lake, files: list[str] | None = None) -> list[tuple[object, ...]]:
    """Every row the lake holds (or ``files`` hold), as ``ROWS_SQL`` gives them, in id order."""
    paths = [lake.path(f) for f in files] if files is not None else lake.root
    dataset = ds.dataset(
        paths,
        filesystem=lake.filesystem,
        format="parquet",
        partitioning=partitioning(),
        partition_base_dir=lake.root,
    )
    table = dataset.to_table().sort_by("id")
    for name in ("timestamp", "local_timestamp"):
        at = table.schema.get_field_index(name)
        table = table.set_column(at, name, table.column(name).cast(pa.int64()))
    columns = ["id", "exchange", "symbol", "timestamp", "local_timestamp", "ask_amount"]
    columns += ["ask_price", "bid_price", "bid_amount", "created_at"]
    return [tuple(row[c] for c in columns) for row in table.to_pylist()]


def lake_names(lake: Lake) -> list[str]:
    """Every file's name in the lake (hidden ones too), from one listing of the filesystem."""
    from pyarrow import fs

    selector = fs.FileSelector(lake.root, recursive=True, allow_not_found=True)
    found = lake.filesystem.get_file_info(selector)
    return [info.base_name for info in found if info.type == fs.FileType.File]


async def db_rows(url: str, start_us: int, end_us: int) -> list[tuple[object, ...]]:
    return [tuple(r) for r in await fetch(url, ROWS_SQL, start_us, end_us)]


async def entries(url: str) -> list[lake_catalog.LakeEntry]:
    async with engine_on(url) as engine, engine.connect() as conn:
        return await lake_catalog.overlapping(conn, 0, 2**62)


# -- the checksum -------------------------------------------------------------------------------


async def test_the_checksum_is_the_same_from_the_server_and_from_a_file(
    make_database: MakeDb, lake: Lake
) -> None:
    url = await six_days(make_database, 2_000)
    # awkward values: negative, NULL, the largest the column holds
    await execute(
        url,
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp, ask_amount, ask_price, "
        "bid_price, bid_amount) VALUES "
        f"('BTCUSDT', {JAN_1_2024 + 5}, {JAN_1_2024 + 6}, -0.00000001, NULL, "
        "999999999999.99999999, 0)",
    )
    where = f"timestamp < {JAN_1_2024 + DAY_US}"
    rows = await fetch(url, totals_sql("orderbook_data", where))
    totals = Totals.from_row(tuple(rows[0]))
    server = (await fetch(url, checksum_sql("orderbook_data", where)))[0]
    assert server["rows"] == totals.rows > 300
    assert server["checksum"] == totals.digest()
    assert totals.ask_amount == sum(
        r[5] for r in await db_rows(url, 0, JAN_1_2024 + DAY_US) if r[5] is not None
    )

    async with engine_on(url) as engine:
        await archive.archive(engine, lake, JAN_3 - dt.timedelta(days=1))
    (entry,) = await entries(url)
    table = ds.dataset(
        [lake.path(f) for f in entry.files], filesystem=lake.filesystem, format="parquet"
    ).to_table()
    assert table_totals(table) == totals
    assert entry.checksum == totals.digest() == server["checksum"]
    assert entry.rows == totals.rows
    # one changed value changes it
    assert dataclasses.replace(totals, id=totals.id + 1).digest() != totals.digest()
    assert Totals.of([totals, Totals()]) == totals
    assert totals.text().startswith(f"rows={totals.rows};id=")
    assert Decimal(totals.text().rsplit("=", 1)[1]) == totals.bid_amount


# -- archive, then prune -----------------------------------------------------------------------


async def test_archive_then_prune_keeps_every_row_in_the_lake(
    make_database: MakeDb, lake: Lake
) -> None:
    url = await six_days(make_database)
    cutoff = JAN_1_2024 + 2 * DAY_US
    before = await db_rows(url, 0, cutoff)
    kept = await db_rows(url, cutoff, 2**62)
    lines: list[str] = []
    async with engine_on(url) as engine:
        result = await archive.archive(engine, lake, JAN_3, progress=lines.append)
        assert [a.name for a in result.archived] == [
            "orderbook_data_p20240101",
            "orderbook_data_p20240102",
        ]
        assert result.rows == len(before) == 2_000
        again = await archive.archive(engine, lake, JAN_3)
        assert again.archived == [] and len(again.already_archived) == 2
        # archived, not dropped: PostgreSQL still holds every row
        assert await db_rows(url, 0, cutoff) == before

    assert any("archived orderbook_data_p20240101: 1,000 rows, 4 files" in x for x in lines)
    assert all("rows/s" in x and "MB" in x for x in lines if x.startswith("archived "))
    found = await entries(url)
    assert [(e.start_us, e.end_us) for e in found] == [
        (JAN_1_2024, JAN_1_2024 + DAY_US),
        (JAN_1_2024 + DAY_US, cutoff),
    ]
    assert all(e.dropped_at is None and e.lake_url == lake.url for e in found)
    assert found[0].symbols == ["BNBUSDT", "BTCUSDT", "ETHUSDT", "SOLUSDT"]
    assert sorted(found[0].files) == [
        f"exchange=binance-futures/symbol={s}/date=2024-01-01/part-{JAN_1_2024}-"
        f"{JAN_1_2024 + DAY_US}.parquet"
        for s in ("BNBUSDT", "BTCUSDT", "ETHUSDT", "SOLUSDT")
    ]
    assert lake_rows(lake) == before

    async with engine_on(url) as engine:
        pruned = await partitions.prune(engine, JAN_3, lake=lake)
    assert pruned.dropped == ["orderbook_data_p20240101", "orderbook_data_p20240102"]
    assert pruned.rows == 2_000
    assert len(pruned.files) == 8
    assert await db_rows(url, 0, cutoff) == []
    assert await db_rows(url, cutoff, 2**62) == kept
    assert lake_rows(lake) == before  # count, ids, every value
    assert all(e.dropped_at is not None for e in await entries(url))
    assert not [name for name in lake_names(lake) if name.startswith(".")]


async def test_an_export_of_part_of_a_day_into_the_lake_is_replaced_by_its_archive(
    make_database: MakeDb, lake: Lake
) -> None:
    url = await six_days(make_database)
    before = await db_rows(url, 0, JAN_1_2024 + DAY_US)
    hours = (JAN_1_2024 + 3_600_000_000, JAN_1_2024 + 5 * 3_600_000_000)
    lines: list[str] = []
    async with engine_on(url) as engine:
        exported = await export_parquet(
            engine, symbol="BTCUSDT", start_us=hours[0], end_us=hours[1], out=lake
        )
        assert exported.rows > 0
        await archive.archive(engine, lake, dt.date(2024, 1, 2), progress=lines.append)
    # the archived day's file holds the exported rows: the tree holds each row once
    assert lake_rows(lake) == before
    assert [x for x in lines if x.startswith("removed ")] == [
        f"removed exchange=binance-futures/symbol=BTCUSDT/date=2024-01-01/part-{hours[0]}-"
        f"{hours[1]}.parquet: exchange=binance-futures/symbol=BTCUSDT/date=2024-01-01/"
        f"part-{JAN_1_2024}-{JAN_1_2024 + DAY_US}.parquet holds its rows"
    ]


async def test_prune_with_a_lake_archives_what_is_not_archived_yet(
    make_database: MakeDb, lake: Lake
) -> None:
    url = await six_days(make_database)
    before = await db_rows(url, 0, JAN_1_2024 + 2 * DAY_US)
    async with engine_on(url) as engine:
        await archive.archive(engine, lake, JAN_3 - dt.timedelta(days=1))  # Jan 1 only
        assert len(await archive.archivable(engine, JAN_3)) == 1
        pruned = await partitions.prune(engine, JAN_3, lake=lake)
    assert pruned.dropped == ["orderbook_data_p20240101", "orderbook_data_p20240102"]
    assert [e.rows for e in await entries(url)] == [1_000, 1_000]
    assert lake_rows(lake) == before


async def test_prune_into_a_directory_without_a_lake_configured_records_the_range(
    make_database: MakeDb, tmp_path: Path
) -> None:
    url = await six_days(make_database)
    before = await db_rows(url, 0, JAN_1_2024 + DAY_US)
    async with engine_on(url) as engine:
        pruned = await partitions.prune(engine, dt.date(2024, 1, 2), archive_dir=tmp_path / "d")
    assert pruned.dropped == ["orderbook_data_p20240101"]
    assert all(Path(f).is_relative_to(tmp_path / "d") for f in pruned.files)
    (entry,) = await entries(url)
    assert entry.lake_url == (tmp_path / "d").resolve().as_posix() and entry.dropped_at
    assert lake_rows(archive.directory_lake(tmp_path / "d")) == before


async def test_rows_written_into_an_archived_partition_before_prune_are_not_lost(
    make_database: MakeDb, lake: Lake
) -> None:
    url = await six_days(make_database)
    async with engine_on(url) as engine:
        await archive.archive(engine, lake, JAN_3)
    # late quotes for Jan 1, after its archive: one of a symbol the day had not held
    await execute(
        url,
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp, ask_price) VALUES "
        f"('BTCUSDT', {JAN_1_2024 + 7}, {JAN_1_2024 + 8}, 1.5), "
        f"('XRPUSDT', {JAN_1_2024 + 9}, {JAN_1_2024 + 10}, 0.5)",
    )
    before = await db_rows(url, 0, JAN_1_2024 + 2 * DAY_US)
    assert len(before) == 2_002
    lines: list[str] = []
    async with engine_on(url) as engine:
        pruned = await partitions.prune(engine, JAN_3, lake=lake, progress=lines.append)
    assert pruned.rows == 2_002
    assert any("archiving it again" in line for line in lines)
    assert lake_rows(lake) == before
    first = (await entries(url))[0]
    assert first.rows == 1_002 and "XRPUSDT" in first.symbols and first.dropped_at


@pytest.mark.parametrize("cancel_at", ["archived ", "dropped orderbook_data_p20240101"])
async def test_a_cancelled_prune_leaves_each_partition_whole_in_one_tier(
    make_database: MakeDb, lake: Lake, cancel_at: str
) -> None:
    url = await six_days(make_database, 60_000)
    before = await db_rows(url, 0, JAN_1_2024 + 2 * DAY_US)
    async with engine_on(url) as engine:
        lines: list[str] = []
        task: asyncio.Task[partitions.PruneResult] | None = None

        def say(line: str) -> None:
            lines.append(line)
            if line.startswith(cancel_at) and task is not None:
                task.cancel()

        task = asyncio.create_task(partitions.prune(engine, JAN_3, lake=lake, progress=say))
        with pytest.raises(asyncio.CancelledError):
            await task
    # each day is either still in PostgreSQL, or dropped, marked so, and whole in the lake
    found = {(e.start_us, e.dropped_at is not None): e for e in await entries(url)}
    for day in (0, 1):
        start = JAN_1_2024 + day * DAY_US
        stored = await db_rows(url, start, start + DAY_US)
        wanted = [row for row in before if start <= row[3] < start + DAY_US]  # type: ignore[operator]
        if (start, True) in found:
            assert stored == []
            assert lake_rows(lake, found[start, True].files) == wanted
        else:
            assert stored == wanted
    assert (JAN_1_2024, True) in found or cancel_at == "archived "
    # and the next prune finishes the job
    async with engine_on(url) as engine:
        await partitions.prune(engine, JAN_3, lake=lake)
    assert await db_rows(url, 0, JAN_1_2024 + 2 * DAY_US) == []
    assert lake_rows(lake) == before


async def test_prune_refuses_a_range_archived_in_another_lake(
    make_database: MakeDb, lake: Lake, tmp_path: Path
) -> None:
    url = await six_days(make_database)
    async with engine_on(url) as engine:
        await archive.archive(engine, archive.directory_lake(tmp_path / "elsewhere"), JAN_3)
        skipped = await archive.archive(engine, lake, JAN_3)
        assert skipped.archived == [] and len(skipped.already_archived) == 2
        with pytest.raises(partitions.PartitionError, match="elsewhere"):
            await partitions.prune(engine, JAN_3, lake=lake)
    assert len(await db_rows(url, 0, 2**62)) == 6_000
    assert all(e.dropped_at is None for e in await entries(url))


# -- interruptions and concurrency ---------------------------------------------------------------

ARCHIVE_SCRIPT = """
import asyncio, datetime as dt, sys
from orderbook_store.engine import create_engine
from orderbook_store.files.lake_store import open_lake
from orderbook_store.ops import archive
from orderbook_store.settings import Settings

async def main():
    settings = Settings(database_url=sys.argv[1])  # and LAKE_* from the environment
    engine = create_engine(settings)
    lake = open_lake(settings)
    await archive.archive(engine, lake, dt.date(2024, 1, 2), progress=print)
    await engine.dispose()

asyncio.run(main())
"""


async def test_a_killed_archive_records_nothing_and_a_rerun_completes(
    make_database: MakeDb, lake: Lake, lake_config: LakeConfig
) -> None:
    url = await at_head(make_database)
    async with engine_on(url) as engine:
        await partitions.ensure(engine, ahead=1, today=dt.date(2024, 1, 1))
    await fill(url, 600_000, span=DAY_US)
    env = {**os.environ, **lake_config.env, "PYTHONPATH": str(PROJECT)}
    run = subprocess.Popen([sys.executable, "-c", ARCHIVE_SCRIPT, url], env=env, cwd=PROJECT)
    try:
        deadline = time.monotonic() + 60
        # killed while its first of four files is written (or just written)
        while not lake_names(lake):
            assert run.poll() is None, "the archive ended before it could be killed"
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        run.send_signal(signal.SIGKILL)
    finally:
        await asyncio.to_thread(run.wait)
    assert await entries(url) == []
    before = await db_rows(url, 0, JAN_1_2024 + DAY_US)

    async with engine_on(url) as engine:
        result = await archive.archive(engine, lake, dt.date(2024, 1, 2))
    assert [a.rows for a in result.archived] == [600_000]
    assert lake_rows(lake) == before
    assert [e.rows for e in await entries(url)] == [600_000]
    assert not [name for name in lake_names(lake) if name.endswith(".tmp")]


async def test_a_cancelled_archive_records_nothing(make_database: MakeDb, lake: Lake) -> None:
    url = await six_days(make_database, 300_000)
    async with engine_on(url) as engine:
        task = asyncio.create_task(archive.archive(engine, lake, JAN_3))
        while not [n for n in lake_names(lake) if n.endswith(".parquet")] and not task.done():
            await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await entries(url) == []
        result = await archive.archive(engine, lake, JAN_3)
    assert [a.rows for a in result.archived] == [50_000, 50_000]
    assert lake_rows(lake) == await db_rows(url, 0, JAN_1_2024 + 2 * DAY_US)


async def test_two_archive_runs_at_once_archive_each_partition_once(
    make_database: MakeDb, lake: Lake
) -> None:
    url = await six_days(make_database, 60_000)
    async with engine_on(url) as one, engine_on(url) as two:
        first, second = await asyncio.gather(
            archive.archive(one, lake, dt.date(2024, 1, 6)),
            archive.archive(two, lake, dt.date(2024, 1, 6)),
        )
    done = [a.name for run in (first, second) for a in run.archived]
    assert sorted(done) == [f"orderbook_data_p2024010{d}" for d in range(1, 6)]
    assert len(first.already_archived) + len(second.already_archived) == 5
    assert [e.rows for e in await entries(url)] == [10_000] * 5
    assert lake_rows(lake) == await db_rows(url, 0, JAN_1_2024 + 5 * DAY_US)


async def test_an_empty_partition_is_archived_as_an_empty_range(
    make_database: MakeDb, lake: Lake
) -> None:
    url = await at_head(make_database)
    async with engine_on(url) as engine:
        await partitions.ensure(engine, ahead=2, today=dt.date(2024, 1, 1))
        result = await archive.archive(engine, lake, JAN_3)
        pruned = await partitions.prune(engine, JAN_3, lake=lake)
    assert [a.rows for a in result.archived] == [0, 0]
    assert pruned.dropped == ["orderbook_data_p20240101", "orderbook_data_p20240102"]
    assert [(e.rows, e.files) for e in await entries(url)] == [(0, []), (0, [])]


async def test_file_rows_are_in_timestamp_then_id_order(make_database: MakeDb, lake: Lake) -> None:
    url = await six_days(make_database, 4_000)
    # ties on timestamp: the file puts them in id order
    await execute(
        url,
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) "
        f"SELECT 'BTCUSDT', {JAN_1_2024 + 100}, {JAN_1_2024} + g FROM generate_series(1, 5) g",
    )
    async with engine_on(url) as engine:
        await archive.archive(engine, lake, dt.date(2024, 1, 2))
    for relative in (await entries(url))[0].files:
        table = ds.dataset(lake.path(relative), filesystem=lake.filesystem).to_table()
        assert table.column_names == list(FILE_COLUMNS)
        keys = list(
            zip(
                table.column("timestamp").cast(pa.int64()).to_pylist(),
                table.column("id").to_pylist(),
                strict=True,
            )
        )
        assert keys == sorted(keys)
