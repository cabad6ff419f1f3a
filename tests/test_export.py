"""Parquet export: exact, hive-partitioned, readable by pyarrow/polars/DuckDB, and re-importable."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.cli.files import parse_time_us
from orderbook_store.engine import create_engine
from orderbook_store.errors import ConfigError
from orderbook_store.files.export import export_parquet
from orderbook_store.files.importers import import_paths
from orderbook_store.files.importers.verify import verify_paths
from orderbook_store.ops import migrations
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk

DAY = parse_time_us("2020-02-22")
NEXT_DAY = parse_time_us("2020-02-23")
ROW_SQL = (
    "SELECT exchange, symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price, "
    "bid_amount FROM orderbook_data ORDER BY id"
)


async def rows_of(engine: AsyncEngine) -> list[tuple[object, ...]]:
    async with engine.connect() as conn:
        return [tuple(row) for row in await conn.execute(text(ROW_SQL))]


async def test_export_then_import_into_an_empty_database_round_trips_exactly(
    engine: AsyncEngine, real_quotes_path: Path, tmp_path: Path, make_database: Callable[[], str]
) -> None:
    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    original = await rows_of(engine)
    out = tmp_path / "export"

    summary = await export_parquet(engine, symbol="BTCUSDT", start_us=DAY, end_us=NEXT_DAY, out=out)

    assert summary.rows == 9999
    assert summary.files == [
        out
        / "exchange=binance-futures"
        / "symbol=BTCUSDT"
        / "date=2020-02-22"
        / f"part-{DAY}-{NEXT_DAY}.parquet"
    ]
    empty = Settings(database_url=await asyncio.to_thread(make_database))
    await asyncio.to_thread(migrations.upgrade, empty, "head")
    other = create_engine(empty)
    try:
        imported = await import_paths(other, [out], quarantine=tmp_path / "q2.csv")
        assert [(f.status, f.format, f.rows) for f in imported.files] == [
            ("imported", "parquet", 9999)
        ]
        assert await rows_of(other) == original  # same values, same order, exactly
        verified = await verify_paths(other, [out])
        assert verified.exit_code == 0
        again = await import_paths(other, [out], quarantine=tmp_path / "q2.csv")
        assert [f.status for f in again.files] == ["skipped"]
    finally:
        await other.dispose()


async def test_exported_tree_reads_in_pyarrow_polars_and_duckdb(
    engine: AsyncEngine, real_quotes_path: Path, tmp_path: Path
) -> None:
    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    async with engine.connect() as conn:
        total_ask = (await conn.execute(text("SELECT sum(ask_price) FROM orderbook_data"))).scalar()
        first = (await conn.execute(text("SELECT min(timestamp) FROM orderbook_data"))).scalar()
    out = tmp_path / "export"
    await export_parquet(engine, symbol="BTCUSDT", start_us=DAY, end_us=NEXT_DAY, out=out)

    dataset = ds.dataset(out, format="parquet", partitioning="hive")
    table = dataset.to_table()
    assert table.num_rows == 9999
    assert table.schema.field("timestamp").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("ask_price").type == pa.decimal128(20, 8)
    assert set(table.column("symbol").to_pylist()) == {"BTCUSDT"}
    assert sum(table.column("ask_price").to_pylist()) == total_ask

    frame = pl.scan_parquet(str(out / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert frame.height == 9999
    assert frame["exchange"].unique().to_list() == ["binance-futures"]
    assert frame["timestamp"].dtype == pl.Datetime("us", "UTC")
    assert frame["timestamp"].min() == dt.datetime.fromtimestamp(first / 1e6, tz=dt.timezone.utc)

    glob = str(out / "**" / "*.parquet")
    ((count, symbol, ask_sum),) = duckdb.sql(
        f"SELECT count(*), any_value(symbol), sum(ask_price) "
        f"FROM read_parquet('{glob}', hive_partitioning = true)"
    ).fetchall()
    assert (count, symbol) == (9999, "BTCUSDT")
    assert Decimal(ask_sum) == total_ask


async def test_export_splits_by_utc_date_and_keeps_only_the_range(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    start = parse_time_us("2024-03-01T22:00:00Z")
    walk = QuoteWalk(["SOLUSDT", "ETHUSDT"], start_us=start, step_us=30_000_000)
    quotes = list(walk.until(parse_time_us("2024-03-04T02:00:00Z")))
    csv_path = tmp_path / "walk.csv"
    columns = list(quotes[0])
    csv_path.write_text(
        ",".join(columns)
        + "\n"
        + "".join(",".join(str(q[c]) for c in columns) + "\n" for q in quotes)
    )
    await import_paths(engine, [csv_path], quarantine=tmp_path / "q.csv")
    low, high = parse_time_us("2024-03-01T23:00"), parse_time_us("2024-03-03T12:00")
    out = tmp_path / "export"

    summary = await export_parquet(engine, symbol="SOLUSDT", start_us=low, end_us=high, out=out)

    expected = [q for q in quotes if q["symbol"] == "SOLUSDT" and low <= int(q["timestamp"]) < high]  # type: ignore[call-overload]
    assert summary.rows == len(expected) > 0
    assert [p.parent.name for p in summary.files] == [
        "date=2024-03-01",
        "date=2024-03-02",
        "date=2024-03-03",
    ]
    frame = pl.scan_parquet(str(out / "**" / "*.parquet"), hive_partitioning=True).collect()
    stamps = frame["timestamp"].dt.epoch("us").to_list()
    assert stamps == [q["timestamp"] for q in expected]
    by_date = frame.group_by("date").agg(
        pl.col("timestamp").min().alias("lo"), pl.col("timestamp").max().alias("hi")
    )
    for date, least, most in by_date.iter_rows():
        assert (
            least.date()
            == most.date()
            == (date if isinstance(date, dt.date) else dt.date.fromisoformat(date))
        )


def test_time_arguments_are_utc_dates_times_or_microseconds() -> None:
    assert parse_time_us("2020-02-22") == 1582329600000000
    assert parse_time_us("2020-02-22T00:00:01Z") == 1582329601000000
    assert parse_time_us("2020-02-22T02:00:01+02:00") == 1582329601000000
    assert parse_time_us("1582329601096000") == 1582329601096000
    with pytest.raises(ConfigError, match="ISO date"):
        parse_time_us("yesterday")


async def test_adjacent_exports_add_files_and_an_overlapping_one_is_refused(
    engine: AsyncEngine, real_quotes_path: Path, tmp_path: Path
) -> None:
    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    out = tmp_path / "export"
    middle = parse_time_us("2020-02-22T00:02:00Z")

    first = await export_parquet(engine, symbol="BTCUSDT", start_us=DAY, end_us=middle, out=out)
    second = await export_parquet(
        engine, symbol="BTCUSDT", start_us=middle, end_us=NEXT_DAY, out=out
    )
    again = await export_parquet(engine, symbol="BTCUSDT", start_us=DAY, end_us=middle, out=out)

    assert first.rows + second.rows == 9999 and first.rows > 0 and second.rows > 0
    assert again.files == first.files
    assert sorted(p.name for p in out.rglob("*.parquet")) == [
        f"part-{DAY}-{middle}.parquet",
        f"part-{middle}-{NEXT_DAY}.parquet",
    ]
    assert not list(out.rglob(".*"))  # no temporary file left behind
    with pytest.raises(ConfigError, match="overlaps"):
        await export_parquet(engine, symbol="BTCUSDT", start_us=DAY, end_us=NEXT_DAY, out=out)
    frame = pl.scan_parquet(str(out / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert frame.height == 9999
