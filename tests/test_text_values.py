"""Text that looks like NULL, a number or a bool stays text: exchange and symbol round-trip
exactly through add, reads, export, CSV import, archive and re-import (no type inference)."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pyarrow.dataset as ds
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.engine import create_engine
from orderbook_store.files import lake_format
from orderbook_store.files.export import export_parquet
from orderbook_store.files.importers import import_paths
from orderbook_store.ops import migrations, partitions
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings

#: Spellings Arrow's CSV reader, pandas or a hive partition parser would take for something else.
TRICKY = (
    *("NA", "NULL", "null", "nan", "NaN", "None", "N/A", "#N/A", "true", "1e5", "007"),
    *("  ", " NA ", '""'),
)
START_US = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z
DAY_US = 86_400_000_000
ROW_SQL = (
    "SELECT exchange, symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price, "
    "bid_amount FROM orderbook_data ORDER BY symbol, exchange, timestamp"
)


def quote(value: str, n: int) -> dict[str, object]:
    return {
        "exchange": value,
        "symbol": value,
        "timestamp": START_US + n * 1_000_000,
        "local_timestamp": START_US + n * 1_000_000 + 5,
        "ask_amount": "1.5",
        "ask_price": "100.25",
        "bid_price": "100.2",
        "bid_amount": "2",
    }


async def rows_of(engine: AsyncEngine) -> list[tuple[object, ...]]:
    async with engine.connect() as conn:
        return [tuple(row) for row in await conn.execute(text(ROW_SQL))]


async def fresh_engine(make_database: Callable[[], str]) -> AsyncEngine:
    settings = Settings(database_url=await asyncio.to_thread(make_database))
    await asyncio.to_thread(migrations.upgrade, settings, "head")
    return create_engine(settings)


async def test_null_looking_names_round_trip_through_reads_export_and_import(
    repo: OrderbookRepository, engine: AsyncEngine, tmp_path: Path, make_database: Callable[[], str]
) -> None:
    for n, value in enumerate(TRICKY):
        await repo.add(quote(value, n))
    await repo.flush()
    stored = await rows_of(engine)
    assert sorted({row[0] for row in stored}) == sorted(TRICKY)

    for value in TRICKY:
        frame = await repo.quotes(value, START_US, START_US + DAY_US, exchange=value)
        assert frame["symbol"].tolist() == [value], value
        assert frame["exchange"].tolist() == [value], value
        table = await repo.quotes(value, START_US, START_US + DAY_US, output="arrow")
        assert table.column("exchange").to_pylist() == [value], value
        polars = await repo.quotes(value, START_US, START_US + DAY_US, output="polars")
        assert polars["symbol"].to_list() == [value], value
    latest = await repo.latest()
    assert sorted(latest["symbol"].tolist()) == sorted(TRICKY)

    out = tmp_path / "export"
    for value in TRICKY:
        summary = await export_parquet(
            engine, symbol=value, start_us=START_US, end_us=START_US + DAY_US, out=out
        )
        assert summary.rows == 1, value
    other = await fresh_engine(make_database)
    try:
        imported = await import_paths(other, [out], quarantine=tmp_path / "q.csv")
        assert {f.status for f in imported.files} == {"imported"}, imported.files
        assert await rows_of(other) == stored
    finally:
        await other.dispose()


async def test_null_looking_names_round_trip_through_csv_import(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    header = list(quote("x", 0))
    path = tmp_path / "quotes.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([quote(value, n)[c] for c in header] for n, value in enumerate(TRICKY))

    imported = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")

    assert [(f.status, f.rows) for f in imported.files] == [("imported", len(TRICKY))]
    stored = await rows_of(engine)
    assert sorted((row[0], row[1]) for row in stored) == sorted((v, v) for v in TRICKY)


async def test_null_looking_names_survive_archive_and_re_import(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    engine = await fresh_engine(make_database)
    other = await fresh_engine(make_database)
    try:
        await partitions.ensure(engine, ahead=2, today=dt.date(2024, 1, 1))
        async with OrderbookRepository(engine) as repo:
            for n, value in enumerate(TRICKY):
                await repo.add(quote(value, n))
        stored = await rows_of(engine)
        result = await partitions.prune(engine, dt.date(2024, 1, 2), archive_dir=tmp_path / "a")
        assert result.rows == len(TRICKY)
        # the names live in the lake's paths (hive, escaped), read back as they were
        archived = ds.dataset(
            tmp_path / "a", format="parquet", partitioning=lake_format.partitioning()
        ).to_table()
        assert sorted(archived.column("symbol").to_pylist()) == sorted(TRICKY)
        assert sorted(archived.column("exchange").to_pylist()) == sorted(TRICKY)

        imported = await import_paths(other, [tmp_path / "a"], quarantine=tmp_path / "q.csv")

        assert {f.status for f in imported.files} == {"imported"}, imported.files
        assert await rows_of(other) == stored
    finally:
        await engine.dispose()
        await other.dispose()
