"""The old collector's calling code runs unchanged against both storage types."""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import time
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.compat import DataManager, FileStorage, PostgreSQLManager
from orderbook_store.errors import ConfigError, OrderbookStoreError
from orderbook_store.models import QUOTE_COLUMNS
from orderbook_store.settings import Settings

BINANCE_MESSAGE = Path(__file__).parent / "data" / "binance_futures_bookTicker_ws.json"
HEADER = "exchange,symbol,timestamp,local_timestamp,ask_amount,ask_price,bid_price,bid_amount"
SECRET = "s3cret-pw-never-logged"


# -- the original plan's calling code, as the collector has it --------------------------------


class Collector:
    """The collector's storage calls, copied from the original plan: a JSON config file,
    ``DataManager(config)``, ``connect()``, ``save_record()`` per quote, ``shutdown()``."""

    def __init__(self, config_path: str) -> None:
        with open(config_path) as f:
            self.config = json.load(f)
        self.data_manager = DataManager(self.config)
        self.running = False

    async def start(self) -> None:
        await self.data_manager.connect()
        self.running = True

    async def on_book_ticker(self, msg: dict) -> None:  # type: ignore[type-arg]
        record = {
            "exchange": "binance-futures",
            "symbol": msg["s"],
            "timestamp": msg["E"] * 1000,
            "local_timestamp": int(time.time() * 1_000_000),
            "ask_amount": msg["A"],
            "ask_price": msg["a"],
            "bid_price": msg["b"],
            "bid_amount": msg["B"],
        }
        await self.data_manager.save_record(record)

    async def on_record(self, record: dict) -> None:  # type: ignore[type-arg]
        await self.data_manager.save_record(record)

    async def stop(self) -> None:
        self.running = False
        await self.data_manager.shutdown()


def write_config(tmp_path: Path, config: Mapping[str, object]) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def file_records(real_quotes_text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(real_quotes_text)))


def bad_record() -> dict[str, object]:
    return {
        "exchange": "binance-futures",
        "symbol": "BTCUSDT",
        "timestamp": 1_582_329_601_096,  # milliseconds: rejected
        "local_timestamp": 1_582_329_603_502_092,
        "ask_amount": "0.84",
        "ask_price": "9682",
        "bid_price": "9681.92",
        "bid_amount": "0.67",
    }


# -- file storage ----------------------------------------------------------------------------


def file_config(base_dir: Path, compress: bool = False) -> dict[str, object]:
    return {"storage": {"type": "file"}, "file": {"base_dir": str(base_dir), "compress": compress}}


@pytest.mark.parametrize("compress", [False, True])
async def test_collector_on_file_storage_reproduces_the_tardis_file(
    tmp_path: Path, real_quotes_text: str, compress: bool, caplog: pytest.LogCaptureFixture
) -> None:
    collector = Collector(write_config(tmp_path, file_config(tmp_path / "quotes", compress)))
    await collector.start()
    records = file_records(real_quotes_text)
    for i, record in enumerate(records):
        await collector.on_record(record)
        if i == 5_000:
            with caplog.at_level(logging.WARNING, logger="orderbook_store.compat"):
                await collector.on_record(bad_record())
    await collector.stop()

    suffix = ".csv.gz" if compress else ".csv"
    path = tmp_path / "quotes" / "binance-futures" / "BTCUSDT" / f"2020-02-22{suffix}"
    assert sorted(p.name for p in (tmp_path / "quotes").rglob("*.csv*")) == [path.name]
    content = gzip.decompress(path.read_bytes()).decode() if compress else path.read_text()
    # Byte for byte the file it came from: same header, same rows, same spelling of numbers.
    assert content == real_quotes_text
    assert collector.data_manager.saved == 9_999
    assert collector.data_manager.rejected == 1
    assert "milliseconds" in caplog.text and "timestamp" in caplog.text


async def test_file_storage_appends_and_writes_the_header_once(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, file_config(tmp_path))
    message = json.loads(BINANCE_MESSAGE.read_text())
    for _ in range(2):  # two collector runs on the same day
        collector = Collector(config_path)
        await collector.start()
        await collector.on_book_ticker(message)
        await collector.stop()
    today = time.strftime("%Y-%m-%d", time.gmtime())
    path = tmp_path / "binance-futures" / "BNBUSDT" / f"{today}.csv"
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER
    assert len(lines) == 3
    for line in lines[1:]:
        fields = line.split(",")
        assert fields[:3] == ["binance-futures", "BNBUSDT", "1568014460893000"]
        assert fields[4:] == ["40.66000000", "25.36520000", "25.35190000", "31.21000000"]


async def test_file_storage_splits_days_by_local_timestamp_and_keeps_nulls(
    tmp_path: Path,
) -> None:
    storage = FileStorage(base_dir=tmp_path, compress=True)
    await storage.connect()
    before_midnight = 1_582_415_999_999_999  # 2020-02-22T23:59:59.999999Z
    for local in (before_midnight, before_midnight + 1):
        assert await storage.save_record(
            {
                "symbol": "ETHUSDT",
                "timestamp": before_midnight,
                "local_timestamp": local,
                "bid_price": 9681.92,
                "bid_amount": 0,
            }
        )
    await storage.shutdown()
    folder = tmp_path / "binance-futures" / "ETHUSDT"
    assert sorted(p.name for p in folder.iterdir()) == ["2020-02-22.csv.gz", "2020-02-23.csv.gz"]
    with gzip.open(folder / "2020-02-23.csv.gz", "rt") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [
        {
            "exchange": "binance-futures",
            "symbol": "ETHUSDT",
            "timestamp": str(before_midnight),
            "local_timestamp": str(before_midnight + 1),
            "ask_amount": "",
            "ask_price": "",
            "bid_price": "9681.92",
            "bid_amount": "0",
        }
    ]


async def test_file_storage_keeps_hostile_names_inside_its_directory(tmp_path: Path) -> None:
    base = tmp_path / "base"
    storage = FileStorage(base_dir=base)
    await storage.connect()
    for symbol in ("..", "../../etc", "A/B", "A\\B", "BTC,USDT"):
        record = {"symbol": symbol, "timestamp": 1_582_329_601_096_000}
        record["local_timestamp"] = 1_582_329_601_096_000
        assert await storage.save_record(record)
    await storage.shutdown()
    written = sorted(base.rglob("*.csv"))
    assert len(written) == 5
    assert all(base in path.parents for path in written)
    assert not (tmp_path / "etc").exists()
    symbols = []
    for path in written:
        with path.open(newline="") as fh:
            symbols += [row["symbol"] for row in csv.DictReader(fh)]
    assert sorted(symbols) == sorted(["..", "../../etc", "A/B", "A\\B", "BTC,USDT"])


def test_data_manager_refuses_an_unknown_storage_type() -> None:
    with pytest.raises(ConfigError, match=r"storage\.type"):
        DataManager({"storage": {"type": "s3"}})


async def test_saving_before_connect_is_an_error_of_the_family() -> None:
    manager = PostgreSQLManager({"postgresql": {"host": "db", "port": 5432}})
    with pytest.raises(OrderbookStoreError, match="before connect"):
        await manager.save_record({"symbol": "BTCUSDT"})


def test_data_manager_chooses_the_storage(tmp_path: Path) -> None:
    assert isinstance(DataManager(file_config(tmp_path)).storage, FileStorage)
    config = {"storage": {"type": "postgresql"}, "postgresql": {"host": "db", "port": 5432}}
    assert isinstance(DataManager(config).storage, PostgreSQLManager)


# -- PostgreSQL ------------------------------------------------------------------------------


def postgres_config(settings: Settings) -> dict[str, object]:
    """The old config shape, pointing at this run's database."""
    return {
        "storage": {"type": "postgresql"},
        "postgresql": {
            "host": settings.host,
            "port": settings.port,
            "database": settings.name,
            "user": settings.user,
            "password": "from_env",
            "pool_size": 4,
            "batch_size": 50,
        },
    }


async def stored_rows(engine: AsyncEngine) -> list[tuple[object, ...]]:
    columns = ", ".join(f'"{name}"' for name in QUOTE_COLUMNS)
    async with engine.connect() as conn:
        result = await conn.execute(text(f"SELECT {columns} FROM orderbook_data"))
        return [tuple(row) for row in result]


def as_table_row(record: Mapping[str, str]) -> tuple[object, ...]:
    return (
        record["exchange"],
        record["symbol"],
        int(record["timestamp"]),
        int(record["local_timestamp"]),
        *(Decimal(record[name]) for name in QUOTE_COLUMNS[4:]),
    )


async def test_collector_on_postgresql_stores_every_quote_and_skips_bad_ones(
    engine: AsyncEngine,
    settings: Settings,
    tmp_path: Path,
    real_quotes_text: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("DB_PASSWORD", SECRET)  # "from_env"
    monkeypatch.setenv("DB_SSLMODE", "disable")  # the test server speaks no TLS
    monkeypatch.setenv("DB_SPOOL_DIR", str(tmp_path / "spool"))
    collector = Collector(write_config(tmp_path, postgres_config(settings)))
    records = file_records(real_quotes_text)
    with caplog.at_level(logging.DEBUG):
        await collector.start()
        for i, record in enumerate(records):
            await collector.on_record(record)
            if i == 5_000:
                await collector.on_record(bad_record())
        await collector.on_book_ticker(json.loads(BINANCE_MESSAGE.read_text()))
        await collector.stop()

    stored = await stored_rows(engine)
    assert len(stored) == 10_000
    binance = [row for row in stored if row[1] == "BNBUSDT"]
    assert len(binance) == 1
    assert binance[0][2] == 1_568_014_460_893_000
    assert binance[0][4:] == tuple(Decimal(v) for v in ("40.66", "25.3652", "25.3519", "31.21"))
    expected = sorted(as_table_row(record) for record in records)
    assert sorted(row for row in stored if row[1] == "BTCUSDT") == expected  # type: ignore[type-var]
    assert collector.data_manager.saved == 10_000
    assert collector.data_manager.rejected == 1
    assert "milliseconds" in caplog.text
    assert SECRET not in caplog.text


async def test_postgresql_manager_used_directly(
    engine: AsyncEngine, settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DB_SSLMODE", "disable")
    monkeypatch.setenv("DB_SPOOL_DIR", str(tmp_path / "spool"))
    manager = PostgreSQLManager(postgres_config(settings))
    await manager.connect()
    assert await manager.save_record(
        {
            "symbol": "SOLUSDT",
            "timestamp": 1_704_067_200_000_000,
            "local_timestamp": 1_704_067_200_000_001,
            "bid_price": "95.001",
        }
    )
    assert not await manager.save_record({"symbol": "SOLUSDT", "timestamp": "yesterday"})
    await manager.shutdown()
    assert await stored_rows(engine) == [
        (
            "binance-futures",
            "SOLUSDT",
            1_704_067_200_000_000,
            1_704_067_200_000_001,
            None,
            None,
            Decimal("95.001"),
            None,
        )
    ]
    assert (manager.saved, manager.rejected) == (1, 1)
