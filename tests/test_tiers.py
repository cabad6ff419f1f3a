"""Reads across tiers: after partitions go to the lake, every read returns what it did before.

Four days of quotes (two symbols on two exchanges, equal timestamps out of id order, NULLs,
values past 2**53 and past int64 unscaled) in day partitions; the first two days are moved to
the lake (``lake_state.move_partition_to_lake``: what ``archive`` + ``prune`` do), so a read
of the four days is half in the lake and half in PostgreSQL.

Each test runs on each lake of the shared ``lake_config`` fixture (``tests/lakes.py``: a local
directory, and a bucket on the S3 server the tests start).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pandas as pd
import polars as pl
import polars.testing
import pyarrow as pa
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store import connect
from orderbook_store.engine import create_engine
from orderbook_store.errors import ConfigError, LakeUnreadable
from orderbook_store.files.lake_store import Lake, open_lake
from orderbook_store.ops import migrations, partitions
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings

from lake_state import move_partition_to_lake
from lakes import LakeConfig

DAY = 86_400_000_000
HOUR = 3_600_000_000
D1 = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z
DAYS = [D1 + i * DAY for i in range(4)]
LAKE_DAYS = DAYS[:2]  # moved to the lake; DAYS[2:] stay in PostgreSQL
ROWS_PER_DAY = 240
START, END = D1 + 3 * HOUR, DAYS[3] + 5 * HOUR  # half in the lake, half in PostgreSQL
OUTPUTS = ("pandas", "polars", "arrow", "numpy")
ODD = "Q/Z %é=1"
COLUMNS = ["id", "symbol", "timestamp", "exchange", "bid_price", "ask_amount"]


@dataclass
class Tiers:
    settings: Settings
    engine: AsyncEngine
    repo: OrderbookRepository
    lake: Lake

    async def to_lake(self) -> int:
        """The first two days' partitions moved to the lake; returns the rows moved."""
        moved = 0
        for day in LAKE_DAYS:
            moved += await move_partition_to_lake(self.settings, self.lake, day, day + DAY)
        return moved

    async def sql(self, statement: str, *args: object) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(**self.settings.asyncpg_connect_kwargs())
        try:
            return await conn.fetch(statement, *args)
        finally:
            await conn.close()


def _value(rng: random.Random, base: int) -> str:
    return f"{base + rng.randrange(0, 10**10) / 10**8:.8f}"


def _quotes() -> list[tuple[object, ...]]:
    """The rows, shuffled so ids do not follow time (equal timestamps then need the id order)."""
    rng = random.Random(14)
    rows: list[tuple[object, ...]] = []
    for day in DAYS:
        for symbol in ("AAA", "BBB"):
            stamp = day
            for k in range(ROWS_PER_DAY):
                if k % 7 != 3:  # every 7th row repeats the timestamp before it
                    stamp = day + k * (DAY // ROWS_PER_DAY) + rng.randrange(1, 1000)
                exchange = "okx" if k % 5 == 0 else "binance-futures"
                bid = _value(rng, 40_000)
                ask = f"{Decimal(bid) + Decimal(rng.randrange(1, 10**6)) / 10**8:.8f}"
                amount = None if k % 11 == 0 else _value(rng, 0)
                if k == 17:  # unscaled past 2**53, and past int64
                    bid, ask = "99999999999.12345678", "999999999999.99999999"
                rows.append(
                    (exchange, symbol, stamp, stamp + 1500, _value(rng, 1), ask, bid, amount)
                )
    for k in range(50):  # CCC trades on the first day only: it ends up only in the lake
        stamp = D1 + HOUR + k * 60_000_000
        rows.append(("binance-futures", "CCC", stamp, stamp + 9, "1", "2.5", "2.25", "3"))
    for k in range(5):  # a name the lake's paths must escape, also only in the lake
        stamp = D1 + 2 * HOUR + k
        rows.append(("binance-futures", ODD, stamp, stamp + 9, "1", "2.5", "2.25", "3"))
    rng.shuffle(rows)
    return rows


QUOTE_FIELDS = (
    "exchange",
    "symbol",
    "timestamp",
    "local_timestamp",
    "ask_amount",
    "ask_price",
    "bid_price",
    "bid_amount",
)


async def _fill(settings: Settings) -> None:
    conn = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        records = [
            (*r[:4], *(None if v is None else Decimal(str(v)) for v in r[4:])) for r in _quotes()
        ]
        await conn.copy_records_to_table("orderbook_data", records=records, columns=QUOTE_FIELDS)
    finally:
        await conn.close()


@pytest.fixture
async def tiers(
    make_database: Callable[[], str], lake_config: LakeConfig, tmp_path: Path
) -> AsyncIterator[Tiers]:
    url = await asyncio.to_thread(make_database)
    settings = lake_config.settings(database_url=url, pool_size=4, spool_dir=tmp_path / "spool")
    await asyncio.to_thread(migrations.upgrade, settings, "head")
    engine = create_engine(settings)
    await _fill(settings)
    await partitions.ensure(
        engine, ahead=0, period="day", since=dt.date(2024, 1, 1), today=dt.date(2024, 1, 4)
    )
    lake = open_lake(settings)
    assert lake is not None
    async with OrderbookRepository(engine, settings=settings) as repo:
        found = Tiers(settings, engine, repo, lake)
        await found.sql("ANALYZE orderbook_data")
        yield found
    await engine.dispose()


def assert_same(a: object, b: object) -> None:
    """Equal values, dtypes, columns and order, whatever the output type."""
    assert type(a) is type(b)
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True)  # type: ignore[arg-type]
    elif isinstance(a, pl.DataFrame):
        polars.testing.assert_frame_equal(a, b, check_exact=True)  # type: ignore[arg-type]
    elif isinstance(a, pa.Table):
        assert isinstance(b, pa.Table)
        assert a.schema == b.schema
        pd.testing.assert_frame_equal(a.to_pandas(), b.to_pandas(), check_exact=True)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for name in a:
            assert a[name].dtype == b[name].dtype, name
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        raise AssertionError(f"unexpected result type {type(a)}")


Read = Callable[[Any], Awaitable[object]]


async def _chunks(stream: AsyncIterator[object]) -> list[object]:
    return [chunk async for chunk in stream]


def _asof_times() -> list[int]:
    rng = random.Random(7)
    times = sorted(rng.randrange(D1 - HOUR, DAYS[3] + DAY + HOUR) for _ in range(200))
    # The first instants of the PostgreSQL days: the quote in force is the lake's last one.
    return [*times, DAYS[2], DAYS[2] + 1, DAYS[1] + 5, D1 - 1, D1 + 2 * DAY - 1]


def _reads() -> dict[str, Read]:
    """Every read, by name: each output, exact, columns, several symbols, exchange, streams,
    latest, as-of (probes and range) and resample."""
    reads: dict[str, Read] = {}
    for output in OUTPUTS:
        for exact in (False, True):
            reads[f"quotes {output} exact={exact}"] = lambda r, o=output, e=exact: r.quotes(
                ["AAA", "BBB"], START, END, output=o, exact=e
            )
        reads[f"quotes {output} columns"] = lambda r, o=output: r.quotes(
            "AAA", START, END, columns=COLUMNS, output=o
        )
        reads[f"iter_quotes {output}"] = lambda r, o=output: _chunks(
            r.iter_quotes(["AAA", "BBB"], START, END, chunk_rows=97, output=o)
        )
        reads[f"latest {output}"] = lambda r, o=output: r.latest(output=o)
        reads[f"asof {output}"] = lambda r, o=output: r.asof("AAA", _asof_times(), output=o)
        reads[f"resample {output}"] = lambda r, o=output: r.resample(
            "AAA", START, END, "1h30min", output=o
        )
    reads["quotes okx exact"] = lambda r: r.quotes("BBB", START, END, exchange="okx", exact=True)
    reads["quotes whole days"] = lambda r: r.quotes("BBB", D1, DAYS[3] + DAY)
    reads["iter_quotes exact columns"] = lambda r: _chunks(
        r.iter_quotes("AAA", D1, END, chunk_rows=1000, exact=True, columns=COLUMNS)
    )
    reads["latest some exact"] = lambda r: r.latest(["BBB", "AAA", "NOSUCH"], exact=True)
    reads["asof exact okx"] = lambda r: r.asof("BBB", _asof_times(), exchange="okx", exact=True)
    reads["resample 7min"] = lambda r: r.resample("BBB", D1, DAYS[3] + DAY, "7min")
    reads["resample 1D okx"] = lambda r: r.resample("AAA", D1 - DAY, END, "1D", exchange="okx")
    reads["resample 1us"] = lambda r: r.resample("AAA", D1, D1 + 2 * HOUR, 1)
    return reads


async def _asof_by_range(repo: OrderbookRepository) -> object:
    reader = repo._read_path
    reader.asof_range_min_times = 10
    try:
        return await repo.asof("BBB", _asof_times())
    finally:
        reader.asof_range_min_times = type(reader).asof_range_min_times


async def test_every_read_equals_its_result_before_the_prune(tiers: Tiers) -> None:
    reads = _reads()
    reads["asof by one range read"] = _asof_by_range
    before = {name: await read(tiers.repo) for name, read in reads.items()}
    assert len(before["quotes pandas exact=False"]) > 3 * ROWS_PER_DAY  # both tiers hold rows
    moved = await tiers.to_lake()
    assert moved == 2 * 2 * ROWS_PER_DAY + 50 + 5
    stored = await tiers.sql(
        "SELECT count(*) FROM orderbook_data WHERE timestamp < $1::bigint", DAYS[2]
    )
    assert stored[0][0] == 0  # the first two days are only in the lake now
    for name, read in reads.items():
        try:
            assert_same(await read(tiers.repo), before[name])
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc


async def test_the_sync_face_reads_across_tiers(tiers: Tiers) -> None:
    def sync_reads() -> dict[str, object]:
        with connect(tiers.settings) as store:
            return {
                "quotes": store.quotes(["AAA", "CCC"], START, END, exact=True),
                "chunks": list(store.iter_quotes("BBB", D1, END, chunk_rows=500)),
                "latest": store.latest(),
                "asof": store.asof("AAA", _asof_times()),
                "resample": store.resample("BBB", D1, END, "1h"),
            }

    before = await asyncio.to_thread(sync_reads)
    await tiers.to_lake()
    after = await asyncio.to_thread(sync_reads)
    for name in before:
        assert_same(after[name], before[name])


async def test_late_rows_in_a_dropped_range_merge_in_time_and_id_order(tiers: Tiers) -> None:
    before = await tiers.repo.quotes("AAA", D1, END, columns=["id", *QUOTE_FIELDS])
    await tiers.to_lake()
    # A late quote at the very time of a lake quote (its id is larger: it comes after it),
    # and one between two lake quotes; both land in the default partition.
    tie = int(before["timestamp"].iloc[100].value // 1000)
    between = tie + 1
    await tiers.repo.insert_many(
        [
            {
                "symbol": "AAA",
                "timestamp": t,
                "local_timestamp": t + 5,
                "ask_amount": "7",
                "ask_price": "123.5",
                "bid_price": "123.25",
                "bid_amount": None,
            }
            for t in (tie, between)
        ]
    )
    where = await tiers.sql(
        "SELECT tableoid::regclass::text FROM orderbook_data WHERE symbol = 'AAA'"
        " AND timestamp < $1::bigint",
        DAYS[2],
    )
    assert [r[0] for r in where] == ["orderbook_data_default"] * 2
    late = await tiers.repo.quotes("AAA", tie, between + 1, columns=["id", *QUOTE_FIELDS])
    assert late["ask_price"].tolist().count(123.5) == 2
    expected = (
        pd.concat([before, late[late["ask_price"] == 123.5]], ignore_index=True)
        .sort_values(["timestamp", "id"], kind="stable")
        .reset_index(drop=True)
    )
    expected["symbol"] = expected["symbol"].astype(before["symbol"].dtype)
    expected["exchange"] = expected["exchange"].astype(late["exchange"].dtype)
    got = await tiers.repo.quotes("AAA", D1, END, columns=["id", *QUOTE_FIELDS])
    assert len(got) == len(before) + 2
    pd.testing.assert_frame_equal(
        got.astype({"exchange": object}), expected.astype({"exchange": object}), check_exact=True
    )
    chunks = [
        c
        async for c in tiers.repo.iter_quotes(
            "AAA", D1, END, chunk_rows=333, columns=["id", *QUOTE_FIELDS]
        )
    ]
    joined = pd.concat(chunks, ignore_index=True)
    assert joined["id"].tolist() == got["id"].tolist()
    assert [len(c) for c in chunks][:-1] == [333] * (len(chunks) - 1)
    # As-of at the tie is the late quote (larger id); resample counts both.
    asof = await tiers.repo.asof("AAA", [tie, between])
    assert asof["ask_price"].tolist() == [123.5, 123.5]
    bucket = await tiers.repo.resample("AAA", tie, between + 1, "1h")
    assert bucket["quotes"].tolist() == [
        int(
            (
                (got["timestamp"] >= late["timestamp"].iloc[0])
                & (got["timestamp"] <= late["timestamp"].iloc[-1])
            ).sum()
        )
    ]
    assert bucket["last_ask"].tolist() == [123.5]


async def test_a_symbol_only_in_the_lake_still_answers(tiers: Tiers) -> None:
    before = {
        "quotes": await tiers.repo.quotes("CCC", D1, END, output="polars"),
        "latest": await tiers.repo.latest("CCC"),
        "asof": await tiers.repo.asof("CCC", [D1, D1 + 2 * HOUR, END]),
        "resample": await tiers.repo.resample("CCC", D1, END, "10min"),
    }
    assert len(before["quotes"]) == 50
    await tiers.to_lake()
    assert (await tiers.sql("SELECT count(*) FROM orderbook_data WHERE symbol = 'CCC'"))[0][0] == 0
    assert_same(await tiers.repo.quotes("CCC", D1, END, output="polars"), before["quotes"])
    assert_same(await tiers.repo.latest("CCC"), before["latest"])
    assert_same(await tiers.repo.asof("CCC", [D1, D1 + 2 * HOUR, END]), before["asof"])
    assert_same(await tiers.repo.resample("CCC", D1, END, "10min"), before["resample"])
    assert "CCC" in (await tiers.repo.latest())["symbol"].tolist()
    odd = await tiers.repo.quotes(ODD, D1, END, columns=["id", "symbol", "timestamp"])
    assert odd["symbol"].tolist() == [ODD] * 5
    assert (await tiers.repo.latest(ODD))["timestamp"].tolist() == [odd["timestamp"].iloc[-1]]


async def test_an_unknown_symbol_gives_the_same_empty_results(tiers: Tiers) -> None:
    async def unknown(repo: OrderbookRepository) -> list[object]:
        return [
            await repo.quotes("NOSUCH", START, END),
            await repo.quotes("NOSUCH", START, END, output="arrow", exact=True),
            await _chunks(repo.iter_quotes("NOSUCH", START, END)),
            await repo.latest(["NOSUCH"]),
            await repo.asof("NOSUCH", [START, END]),
            await repo.resample("NOSUCH", START, END, "1h"),
        ]

    before = await unknown(tiers.repo)
    await tiers.to_lake()
    after = await unknown(tiers.repo)
    assert_same(after, before)
    assert len(after[0]) == 0 and after[2] == []


async def test_only_the_files_of_the_read_are_opened(tiers: Tiers) -> None:
    before = await tiers.repo.quotes("AAA", START, END)
    await tiers.to_lake()
    # Another symbol's files gone: a read of AAA never looks at them (no listing either).
    tiers.lake.filesystem.delete_dir(tiers.lake.path("exchange=binance-futures/symbol=BBB"))
    assert_same(await tiers.repo.quotes("AAA", START, END), before)


async def test_without_lake_url_a_read_of_the_lake_fails_naming_it(tiers: Tiers) -> None:
    await tiers.to_lake()
    settings = tiers.settings.model_copy(update={"lake_url": None})
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine, settings=settings) as repo:
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: repo.quotes("AAA", START, END),
                lambda: _chunks(repo.iter_quotes("AAA", START, END)),
                lambda: repo.latest(),
                lambda: repo.latest("CCC"),
                lambda: repo.asof("AAA", [DAYS[2] + 1]),
                lambda: repo.resample("AAA", START, END),
            ]
            for call in calls:
                with pytest.raises(ConfigError, match=r"LAKE_URL is not set") as caught:
                    await call()
                assert "2024-01-01" in str(caught.value) or "2024-01-02" in str(caught.value)
            # The PostgreSQL days read as before without a lake.
            stored = await repo.quotes("AAA", DAYS[2], END)
            assert len(stored) == ROWS_PER_DAY + int(
                (await tiers.repo.quotes("AAA", DAYS[3], END)).shape[0]
            )
    finally:
        await engine.dispose()


async def test_a_database_before_the_catalog_reads_from_postgresql(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    url = await asyncio.to_thread(make_database)
    settings = Settings(database_url=url, pool_size=2, lake_url=str(tmp_path / "lake"))
    await asyncio.to_thread(migrations.upgrade, settings, "0006")
    await _fill(settings)
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine, settings=settings) as repo:
            frame = await repo.quotes(["AAA", "BBB", "CCC"], D1, DAYS[3] + DAY)
            assert len(frame) == 4 * 2 * ROWS_PER_DAY + 50
            assert len(await repo.latest()) == 4
            assert len(await repo.resample("AAA", D1, END, "1D")) == 4
    finally:
        await engine.dispose()


async def test_a_missing_lake_file_fails_naming_the_lake_and_the_file(tiers: Tiers) -> None:
    await tiers.to_lake()
    gone = "exchange=binance-futures/symbol=AAA/date=2024-01-02"
    tiers.lake.filesystem.delete_dir(tiers.lake.path(gone))
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: tiers.repo.quotes("AAA", START, END),
        lambda: _chunks(tiers.repo.iter_quotes("AAA", START, END)),
        lambda: tiers.repo.asof("AAA", [DAYS[2]]),
        lambda: tiers.repo.resample("AAA", START, END),
    ]
    for call in calls:
        with pytest.raises(LakeUnreadable, match="LAKE_URL") as caught:
            await call()
        assert gone in str(caught.value) and tiers.lake.url in str(caught.value)
    assert len(await tiers.repo.quotes("AAA", DAYS[2], END)) > 0  # PostgreSQL's days still read


async def test_a_prune_waits_for_a_read_in_progress(tiers: Tiers) -> None:
    before = await tiers.repo.quotes("AAA", START, END, columns=["id"])
    stream = tiers.repo.iter_quotes("AAA", START, END, chunk_rows=100, columns=["id"])
    chunks = [await stream.__anext__()]  # the read's transaction is open
    mover = asyncio.ensure_future(tiers.to_lake())
    await asyncio.sleep(0.5)
    assert not mover.done()  # the partitions cannot go while the read holds its snapshot
    chunks += [chunk async for chunk in stream]
    assert await mover == 2 * 2 * ROWS_PER_DAY + 50 + 5
    assert pd.concat(chunks, ignore_index=True)["id"].tolist() == before["id"].tolist()
    assert_same(await tiers.repo.quotes("AAA", START, END, columns=["id"]), before)
