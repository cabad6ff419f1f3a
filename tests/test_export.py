"""Export: the lake format, exact, into a directory or the configured lake (local and S3),
readable by pyarrow, polars and DuckDB, and re-importable."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pyarrow import fs
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.cli.files import parse_time_us
from orderbook_store.engine import create_engine
from orderbook_store.errors import ConfigError
from orderbook_store.files.export import export_parquet
from orderbook_store.files.importers import import_paths
from orderbook_store.files.importers.verify import verify_paths
from orderbook_store.files.lake_format import (
    FILE_COLUMNS,
    FORMAT_KEY,
    FORMAT_VERSION,
    ROW_GROUP_ROWS,
    LakeFile,
    file_schema,
    partitioning,
)
from orderbook_store.files.lake_store import Lake
from orderbook_store.ops import migrations
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk

from lakes import LakeConfig

DAY = parse_time_us("2020-02-22")
NEXT_DAY = parse_time_us("2020-02-23")
ROW_SQL = (
    "SELECT exchange, symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price, "
    "bid_amount FROM orderbook_data ORDER BY id"
)
#: Every column, in the lake's order.
ALL_SQL = (
    "SELECT exchange, symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price, "
    "bid_amount, id, created_at FROM orderbook_data ORDER BY timestamp, id"
)
PART = f"exchange=binance-futures/symbol=BTCUSDT/date=2020-02-22/part-{DAY}-{NEXT_DAY}.parquet"


async def rows_of(engine: AsyncEngine, sql: str = ROW_SQL) -> list[tuple[object, ...]]:
    async with engine.connect() as conn:
        return [tuple(row) for row in await conn.execute(text(sql))]


def lake_files(lake: Lake) -> list[str]:
    """Every file under the lake's root, relative to it, sorted."""
    selector = fs.FileSelector(lake.root, recursive=True, allow_not_found=True)
    return sorted(
        lake.relative(info.path)
        for info in lake.filesystem.get_file_info(selector)
        if info.type == fs.FileType.File
    )


def read_in_file_order(lake: Lake) -> pa.Table:
    """Each file read as written, in path order (dates ascend), partition values from paths."""
    tables = []
    for relative in lake_files(lake):
        table = pq.read_table(lake.path(relative), filesystem=lake.filesystem)
        hive = dict(part.split("=", 1) for part in relative.split("/")[:-1])
        for name in ("exchange", "symbol"):
            table = table.append_column(name, pa.array([hive[name]] * table.num_rows))
        tables.append(table)
    return pa.concat_tables(tables)


def as_db_rows(table: pa.Table) -> list[tuple[object, ...]]:
    """Rows of a lake table in ``ALL_SQL``'s columns and Python types."""
    columns = [
        table.column("exchange").to_pylist(),
        table.column("symbol").to_pylist(),
        table.column("timestamp").cast(pa.int64()).to_pylist(),
        table.column("local_timestamp").cast(pa.int64()).to_pylist(),
        *(table.column(name).to_pylist() for name in FILE_COLUMNS[2:6]),
        table.column("id").to_pylist(),
        table.column("created_at").to_pylist(),
    ]
    return list(zip(*columns, strict=True))


async def test_export_into_a_lake_round_trips_every_value_type_and_order(
    engine: AsyncEngine, real_quotes_path: Path, tmp_path: Path, lake: Lake
) -> None:
    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    stored = await rows_of(engine, ALL_SQL)
    seen: list[int] = []

    summary = await export_parquet(
        engine, symbol="BTCUSDT", start_us=DAY, end_us=NEXT_DAY, out=lake, on_rows=seen.append
    )

    assert summary.rows == sum(seen) == 9999
    prefix = "" if lake.is_local else "s3://"
    assert summary.files == [f"{prefix}{lake.path(PART)}"]
    assert lake_files(lake) == [PART]  # no temporary or partial file beside it
    back = read_in_file_order(lake)
    assert back.schema.remove_metadata() == file_schema().remove_metadata().append(
        pa.field("exchange", pa.string())
    ).append(pa.field("symbol", pa.string()))
    assert as_db_rows(back) == stored  # every value, (timestamp, id) order
    assert all(isinstance(row[9], dt.datetime) for row in stored)  # created_at is there


async def test_the_files_carry_the_format_version_zstd_and_the_formats_encodings(
    engine: AsyncEngine, real_quotes_path: Path, tmp_path: Path, lake: Lake
) -> None:
    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    await export_parquet(engine, symbol="BTCUSDT", start_us=DAY, end_us=NEXT_DAY, out=lake)

    with lake.filesystem.open_input_file(lake.path(PART)) as handle:
        metadata = pq.ParquetFile(handle).metadata
    assert metadata.schema.to_arrow_schema().metadata[FORMAT_KEY] == str(FORMAT_VERSION).encode()
    assert metadata.num_rows == 9999
    group = metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    assert list(columns) == list(FILE_COLUMNS)
    assert {column.compression for column in columns.values()} == {"ZSTD"}
    assert "DELTA_BINARY_PACKED" in columns["timestamp"].encodings
    assert "DELTA_BINARY_PACKED" in columns["id"].encodings
    assert any("DICTIONARY" in e for e in columns["ask_price"].encodings)
    stats = columns["timestamp"].statistics
    assert stats is not None and stats.has_min_max  # range reads skip row groups by these


def test_a_lake_file_makes_whole_row_groups_from_small_writes(tmp_path: Path) -> None:
    lake = Lake(url=str(tmp_path), root=tmp_path.as_posix(), filesystem=fs.LocalFileSystem())
    rows = 2 * ROW_GROUP_ROWS + 1_000
    ids = pa.array(range(rows), pa.int64())
    table = pa.table(
        {
            "timestamp": ids,
            "local_timestamp": ids,
            **{name: pa.array([Decimal("1.5")] * rows) for name in FILE_COLUMNS[2:6]},
            "id": ids,
            "created_at": ids,
        }
    )
    lake_file = LakeFile(lake, "x/part-0-1.parquet")
    for start in range(0, rows, 10_000):  # hour-sized writes, as export makes them
        lake_file.write(table.slice(start, 10_000))
    lake_file.commit()

    metadata = pq.ParquetFile(tmp_path / "x" / "part-0-1.parquet").metadata
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert sizes == [ROW_GROUP_ROWS, ROW_GROUP_ROWS, 1_000]
    assert pq.read_table(tmp_path / "x").column("id").to_pylist() == list(range(rows))


def test_a_lake_file_is_invisible_until_committed_and_abandoning_keeps_the_old_one(
    lake: Lake,
) -> None:
    ids = pa.array(range(1_000), pa.int64())
    table = pa.table(
        {
            "timestamp": ids,
            "local_timestamp": ids,
            **{name: pa.array([Decimal("2.5")] * 1_000) for name in FILE_COLUMNS[2:6]},
            "id": ids,
            "created_at": ids,
        }
    )
    first = LakeFile(lake, "d/part-0-1.parquet")
    first.write(table)
    visible = [f for f in lake_files(lake) if not f.rpartition("/")[2].startswith(".")]
    assert visible == []  # nothing a dataset or a *.parquet glob would take
    first.commit()
    with lake.filesystem.open_input_file(lake.path("d/part-0-1.parquet")) as handle:
        committed = handle.read()

    again = LakeFile(lake, "d/part-0-1.parquet")  # the same range again, then a failure
    again.write(table.slice(0, 10))
    again.abandon()

    assert lake_files(lake) == ["d/part-0-1.parquet"]
    with lake.filesystem.open_input_file(lake.path("d/part-0-1.parquet")) as handle:
        assert handle.read() == committed


async def test_an_export_imports_into_an_empty_database_exactly_with_new_ids(
    engine: AsyncEngine, real_quotes_path: Path, tmp_path: Path, make_database: Callable[[], str]
) -> None:
    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    original = await rows_of(engine)
    out = tmp_path / "export"
    await export_parquet(engine, symbol="BTCUSDT", start_us=DAY, end_us=NEXT_DAY, out=out)
    empty = Settings(database_url=await asyncio.to_thread(make_database))
    await asyncio.to_thread(migrations.upgrade, empty, "head")
    other = create_engine(empty)
    try:
        async with other.begin() as conn:  # ids the file's rows never had
            await conn.execute(
                text("SELECT setval(pg_get_serial_sequence('orderbook_data', 'id'), 5000000)")
            )
        imported = await import_paths(other, [out], quarantine=tmp_path / "q2.csv")
        assert [(f.status, f.format, f.rows) for f in imported.files] == [
            ("imported", "parquet", 9999)
        ]
        assert await rows_of(other) == original  # same values, same order, exactly
        async with other.connect() as conn:
            lowest = (await conn.execute(text("SELECT min(id) FROM orderbook_data"))).scalar()
        assert lowest == 5000001  # new ids: the file's are not reused
        verified = await verify_paths(other, [out])
        assert verified.exit_code == 0
        again = await import_paths(other, [out], quarantine=tmp_path / "q2.csv")
        assert [f.status for f in again.files] == ["skipped"]
    finally:
        await other.dispose()


def polars_options(config: LakeConfig) -> dict[str, str] | None:
    if config.server is None:
        return None
    return {
        "aws_access_key_id": config.server.access_key_id,
        "aws_secret_access_key": config.server.secret_access_key,
        "aws_region": config.server.region,
        "aws_endpoint_url": config.server.endpoint_url,
        "aws_allow_http": "true",
    }


def glob_of(lake: Lake) -> str:
    return f"{lake.path('**', '*.parquet')}" if lake.is_local else f"s3://{lake.root}/**/*.parquet"


async def test_the_lake_reads_in_pyarrow_and_polars_as_hive_partitioned_data(
    engine: AsyncEngine,
    real_quotes_path: Path,
    tmp_path: Path,
    lake: Lake,
    lake_config: LakeConfig,
) -> None:
    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    stored = await rows_of(engine, ALL_SQL)
    await export_parquet(engine, symbol="BTCUSDT", start_us=DAY, end_us=NEXT_DAY, out=lake)

    dataset = ds.dataset(
        lake.root, filesystem=lake.filesystem, format="parquet", partitioning=partitioning()
    )
    table = dataset.to_table(filter=ds.field("symbol") == "BTCUSDT")
    assert table.schema.field("date").type == pa.date32()
    assert set(table.column("date").to_pylist()) == {dt.date(2020, 2, 22)}
    assert as_db_rows(table) == stored

    frame = pl.scan_parquet(
        glob_of(lake), hive_partitioning=True, storage_options=polars_options(lake_config)
    ).collect()
    assert frame["timestamp"].dtype == pl.Datetime("us", "UTC")
    assert frame["ask_price"].dtype == pl.Decimal(20, 8)
    assert frame["exchange"].unique().to_list() == ["binance-futures"]
    assert frame["symbol"].unique().to_list() == ["BTCUSDT"]
    assert frame["date"].unique().to_list() == [dt.date(2020, 2, 22)]
    assert as_db_rows(frame.to_arrow()) == stored


def duckdb_on(config: LakeConfig) -> Any:
    """A DuckDB connection that reads the lake: local as is, S3 through httpfs."""
    connection = duckdb.connect()
    if config.server is None:
        return connection
    try:
        connection.execute("LOAD httpfs")
    except duckdb.Error as exc:
        connection.close()
        pytest.skip(
            "DuckDB's httpfs extension cannot be installed here (DuckDB downloads it from "
            "its own extension site, which this machine cannot reach; the S3 lake is read by "
            f"pyarrow and polars in the test above): {str(exc).splitlines()[0]}"
        )
    address = config.server.endpoint_url.removeprefix("http://")
    connection.execute(
        "CREATE SECRET lake (TYPE s3, KEY_ID $key, SECRET $secret, REGION $region, "
        "ENDPOINT $endpoint, URL_STYLE 'path', USE_SSL false)",
        {
            "key": config.server.access_key_id,
            "secret": config.server.secret_access_key,
            "region": config.server.region,
            "endpoint": address,
        },
    )
    return connection


async def test_the_lake_reads_in_duckdb_as_hive_partitioned_data(
    engine: AsyncEngine,
    real_quotes_path: Path,
    tmp_path: Path,
    lake: Lake,
    lake_config: LakeConfig,
) -> None:
    connection = duckdb_on(lake_config)
    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    async with engine.connect() as conn:
        total_ask = (await conn.execute(text("SELECT sum(ask_price) FROM orderbook_data"))).scalar()
    stored = await rows_of(engine, ALL_SQL)
    await export_parquet(engine, symbol="BTCUSDT", start_us=DAY, end_us=NEXT_DAY, out=lake)

    try:
        source = f"read_parquet('{glob_of(lake)}', hive_partitioning = true)"
        ((count, symbol, day, ask_sum),) = connection.sql(
            f"SELECT count(*), any_value(symbol), any_value(date), sum(ask_price) FROM {source}"
        ).fetchall()
        assert (count, symbol, day) == (9999, "BTCUSDT", dt.date(2020, 2, 22))
        assert Decimal(ask_sum) == total_ask
        table = connection.sql(
            f"SELECT * FROM {source} WHERE symbol = 'BTCUSDT' ORDER BY timestamp, id"
        ).to_arrow_table()
        assert as_db_rows(table) == stored
    finally:
        connection.close()


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
    assert [Path(p).parent.name for p in summary.files] == [
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
        assert least.date() == most.date() == date


def test_time_arguments_are_utc_dates_times_or_microseconds() -> None:
    assert parse_time_us("2020-02-22") == 1582329600000000
    assert parse_time_us("2020-02-22T00:00:01Z") == 1582329601000000
    assert parse_time_us("2020-02-22T02:00:01+02:00") == 1582329601000000
    assert parse_time_us("1582329601096000") == 1582329601096000
    with pytest.raises(ConfigError, match="ISO date"):
        parse_time_us("yesterday")


async def test_an_export_into_the_lake_never_replaces_a_file_the_catalog_records(
    engine: AsyncEngine, real_quotes_path: Path, tmp_path: Path, lake: Lake
) -> None:
    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    await export_parquet(engine, symbol="BTCUSDT", start_us=DAY, end_us=NEXT_DAY, out=lake)
    with lake.filesystem.open_input_file(lake.path(PART)) as handle:
        archived = handle.read()
    async with engine.begin() as conn:  # as `archive` records a verified day
        await conn.execute(
            text(
                "INSERT INTO orderbook_lake_ranges (partition_name, start_us, end_us, symbols, "
                "rows, checksum, files, format_version, lake_url, dropped_at) VALUES "
                "('orderbook_data_p20200222', :start, :end, ARRAY['BTCUSDT'], 9999, :sum, "
                ":files, 1, :url, now())"
            ),
            {"start": DAY, "end": NEXT_DAY, "sum": "0" * 64, "files": [PART], "url": lake.url},
        )
        await conn.execute(text("DELETE FROM orderbook_data WHERE id % 2 = 0"))  # pruned, mostly

    with pytest.raises(ConfigError, match="archived file in the lake's catalog"):
        await export_parquet(engine, symbol="BTCUSDT", start_us=DAY, end_us=NEXT_DAY, out=lake)
    with pytest.raises(ConfigError, match="overlaps"):
        await export_parquet(engine, symbol="BTCUSDT", start_us=DAY, end_us=DAY + 1, out=lake)

    with lake.filesystem.open_input_file(lake.path(PART)) as handle:
        assert handle.read() == archived
    elsewhere = await export_parquet(  # a directory of one's own is not the catalog's
        engine, symbol="BTCUSDT", start_us=DAY, end_us=NEXT_DAY, out=tmp_path / "mine"
    )
    assert elsewhere.rows == len(await rows_of(engine)) < 9999


async def test_adjacent_exports_add_files_and_an_overlapping_one_is_refused(
    engine: AsyncEngine, real_quotes_path: Path, tmp_path: Path, lake: Lake
) -> None:
    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    middle = parse_time_us("2020-02-22T00:02:00Z")
    # Another symbol's file over the whole day is no overlap of BTCUSDT's.
    other = "exchange=binance-futures/symbol=ETHUSDT/date=2020-02-22"
    lake.filesystem.create_dir(lake.path(other), recursive=True)
    with lake.filesystem.open_output_stream(lake.path(other, f"part-{DAY}-{NEXT_DAY}.parquet")):
        pass

    first = await export_parquet(engine, symbol="BTCUSDT", start_us=DAY, end_us=middle, out=lake)
    second = await export_parquet(
        engine, symbol="BTCUSDT", start_us=middle, end_us=NEXT_DAY, out=lake
    )
    again = await export_parquet(engine, symbol="BTCUSDT", start_us=DAY, end_us=middle, out=lake)

    assert first.rows + second.rows == 9999 and first.rows > 0 and second.rows > 0
    assert (again.rows, again.files) == (first.rows, first.files)
    day_dir = "exchange=binance-futures/symbol=BTCUSDT/date=2020-02-22"
    assert lake_files(lake) == [
        f"{day_dir}/part-{DAY}-{middle}.parquet",
        f"{day_dir}/part-{middle}-{NEXT_DAY}.parquet",
        f"{other}/part-{DAY}-{NEXT_DAY}.parquet",
    ]  # the same range again replaced its file; nothing temporary is left
    with pytest.raises(ConfigError, match="overlaps") as refused:
        await export_parquet(engine, symbol="BTCUSDT", start_us=DAY, end_us=NEXT_DAY, out=lake)
    assert f"part-{DAY}-{middle}.parquet" in str(refused.value)
    dataset = ds.dataset(
        lake.path("exchange=binance-futures", "symbol=BTCUSDT"),
        filesystem=lake.filesystem,
        format="parquet",
    )
    assert dataset.count_rows() == 9999
