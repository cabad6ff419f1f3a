"""Range reads, streaming, latest, as-of, resample and features against real PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import gc
import gzip
import io
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import polars as pl
import psutil
import pyarrow as pa
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.engine import create_engine
from orderbook_store.models import DECIMAL_COLUMNS, QUOTE_COLUMNS
from orderbook_store.read import features
from orderbook_store.read.reader import (
    _BIND_SQL,
    Reader,
    plan_quotes,
)

T0 = 1582329600000000  # 2020-02-22 00:00:00 UTC
DAY = 86_400_000_000


def _file_rows(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _expected_frame(rows: list[dict[str, str]]) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "exchange": [r["exchange"] for r in rows],
            "symbol": [r["symbol"] for r in rows],
            "timestamp": np.array([int(r["timestamp"]) for r in rows], dtype=np.int64),
            "local_timestamp": np.array([int(r["local_timestamp"]) for r in rows], dtype=np.int64),
            **{
                c: np.array([float(Decimal(r[c])) for r in rows], dtype=np.float64)
                for c in DECIMAL_COLUMNS
            },
        }
    )
    # File order within equal timestamps = insertion order = id order.
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)


@pytest.fixture
async def real_rows(repo, real_quotes_path) -> list[dict[str, str]]:
    rows = _file_rows(real_quotes_path)
    payload = [
        {**r, "timestamp": int(r["timestamp"]), "local_timestamp": int(r["local_timestamp"])}
        for r in rows
    ]
    assert await repo.insert_many(payload) == 9_999
    return rows


async def _insert(engine: AsyncEngine, rows: list[tuple[str, int, str, str]]) -> None:
    """(symbol, timestamp, bid, ask) rows, with bound parameters."""
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        await raw.executemany(
            "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp,"
            " ask_amount, ask_price, bid_price, bid_amount)"
            " VALUES ($1, $2::bigint, $2::bigint + 100, 1.5, $4::numeric, $3::numeric, 2.5)",
            rows,
        )


def _as_int_us(series: pd.Series) -> np.ndarray:
    return series.dt.tz_localize(None).to_numpy().astype("datetime64[us]").astype(np.int64)


async def test_real_file_round_trips_exactly_in_order(repo, real_rows) -> None:
    got = await repo.quotes("BTCUSDT", T0, T0 + DAY)
    expected = _expected_frame(real_rows)
    assert len(got) == 9_999
    assert list(got.columns) == list(QUOTE_COLUMNS)
    assert str(got["timestamp"].dtype) == "datetime64[us, UTC]"
    assert _as_int_us(got["timestamp"]).tolist() == expected["timestamp"].tolist()
    assert _as_int_us(got["local_timestamp"]).tolist() == expected["local_timestamp"].tolist()
    for column in DECIMAL_COLUMNS:
        assert got[column].dtype == np.float64
        assert got[column].to_numpy().tobytes() == expected[column].to_numpy().tobytes()
    assert set(got["symbol"]) == {"BTCUSDT"} and set(got["exchange"]) == {"binance-futures"}


async def test_equal_timestamps_come_in_id_order(repo, engine, real_rows) -> None:
    frame = await repo.quotes("BTCUSDT", T0, T0 + DAY, columns=["id", "timestamp"], output="numpy")
    ts, ids = frame["timestamp"].astype(np.int64), frame["id"]
    same = ts[1:] == ts[:-1]
    assert same.sum() > 0
    assert (ids[1:][same] > ids[:-1][same]).all()
    # Rewrite heap order so equal timestamps come back out of id order; still sorted by id.
    async with engine.begin() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        await raw.execute(
            "CREATE TEMP TABLE shuffled AS SELECT * FROM orderbook_data ORDER BY id DESC;"
            "DELETE FROM orderbook_data; INSERT INTO orderbook_data SELECT * FROM shuffled;"
        )
    again = await repo.quotes("BTCUSDT", T0, T0 + DAY, columns=["id", "timestamp"], output="numpy")
    assert again["id"].tolist() == ids.tolist()


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (T0 + 60_000_000, T0 + 120_000_000),
        (
            dt.datetime(2020, 2, 22, 0, 1, tzinfo=dt.timezone.utc),
            dt.datetime(2020, 2, 22, 0, 2, tzinfo=dt.timezone.utc),
        ),
        (dt.datetime(2020, 2, 22, 0, 1), dt.datetime(2020, 2, 22, 0, 2)),  # naive = UTC
        (
            dt.datetime(2020, 2, 22, 1, 1, tzinfo=ZoneInfo("Europe/Berlin")),
            dt.datetime(2020, 2, 21, 19, 2, tzinfo=ZoneInfo("America/New_York")),
        ),
        ("2020-02-22T00:01:00Z", "2020-02-22 00:02:00"),
        ("2020-02-22T05:31:00+05:30", "2020-02-22T00:02:00.000000+00:00"),
        (pd.Timestamp("2020-02-22 00:01", tz="UTC"), pd.Timestamp("2020-02-22 00:02")),
        (np.datetime64("2020-02-22T00:01:00"), np.datetime64("2020-02-22T00:02:00.000000000")),
        (np.int64(T0 + 60_000_000), T0 + 120_000_000),
    ],
)
async def test_every_time_form_selects_the_same_half_open_range(repo, real_rows, start, end):
    frame = await repo.quotes("BTCUSDT", start, end, output="numpy")
    ts = frame["timestamp"].astype(np.int64)
    expected = _expected_frame(real_rows)["timestamp"].to_numpy()
    want = expected[(expected >= T0 + 60_000_000) & (expected < T0 + 120_000_000)]
    assert ts.tolist() == want.tolist()
    assert len(ts) > 100


async def test_range_is_half_open_and_sub_microsecond_bounds_round_up(repo, engine) -> None:
    await _insert(engine, [("AAA", T0 + i, "1", "2") for i in range(5)])
    got = await repo.quotes("AAA", T0 + 1, T0 + 3, output="numpy")
    assert got["timestamp"].astype(np.int64).tolist() == [T0 + 1, T0 + 2]
    start = pd.Timestamp(T0 * 1000 + 500, unit="ns", tz="UTC")  # T0 + 0.5 µs
    got = await repo.quotes("AAA", start, T0 + 2, output="numpy")
    assert got["timestamp"].astype(np.int64).tolist() == [T0 + 1]


async def test_several_symbols_come_ordered_by_symbol_then_time(repo, engine) -> None:
    rows = [(s, T0 + i * 10 + k, "100.5", "100.6") for i in range(50) for k, s in enumerate("CBA")]
    await _insert(engine, rows)
    frame = await repo.quotes(["C", "A", "B", "A", "ZZZ"], T0, T0 + DAY)
    assert frame["symbol"].tolist() == ["A"] * 50 + ["B"] * 50 + ["C"] * 50
    for symbol in "ABC":
        part = _as_int_us(frame.loc[frame["symbol"] == symbol, "timestamp"])
        assert (np.diff(part) > 0).all()


@pytest.mark.parametrize("output", ["pandas", "polars", "arrow", "numpy"])
async def test_empty_results_keep_columns_and_dtypes(repo, real_rows, output) -> None:
    full = await repo.quotes("BTCUSDT", T0, T0 + DAY, output=output)
    for start, end, symbols in [
        (T0 - DAY, T0, "BTCUSDT"),  # before the data
        (T0, T0 + DAY, "NOSUCH"),  # unknown symbol
        (T0, T0 + DAY, "X" * 10_000),  # longer than any stored symbol can be
    ]:
        empty = await repo.quotes(symbols, start, end, output=output)
        if output == "pandas":
            assert len(empty) == 0 and list(empty.columns) == list(full.columns)
            assert [str(t) for t in empty.dtypes] == [str(t) for t in full.dtypes]
        elif output == "polars":
            assert empty.height == 0 and empty.schema == full.schema
        elif output == "arrow":
            assert empty.num_rows == 0 and empty.schema == full.schema
        else:
            assert list(empty) == list(full)
            assert all(len(empty[c]) == 0 and empty[c].dtype == full[c].dtype for c in full)


async def test_outputs_agree_and_have_the_promised_types(repo, real_rows) -> None:
    frames = {
        o: await repo.quotes("BTCUSDT", T0, T0 + DAY, output=o)
        for o in ("pandas", "polars", "arrow", "numpy")
    }
    pandas_frame = frames["pandas"]
    assert isinstance(frames["polars"], pl.DataFrame)
    assert frames["polars"].schema["timestamp"] == pl.Datetime("us", "UTC")
    assert isinstance(frames["arrow"], pa.Table)
    assert frames["arrow"].schema.field("timestamp").type == pa.timestamp("us", tz="UTC")
    assert frames["numpy"]["timestamp"].dtype == np.dtype("datetime64[us]")
    for column in DECIMAL_COLUMNS:
        reference = pandas_frame[column].to_numpy()
        assert np.array_equal(frames["polars"][column].to_numpy(), reference)
        assert np.array_equal(frames["arrow"].column(column).to_numpy(), reference)
        assert np.array_equal(frames["numpy"][column], reference)
    assert frames["polars"]["symbol"].to_list() == pandas_frame["symbol"].tolist()
    assert frames["arrow"].column("exchange").to_pylist() == pandas_frame["exchange"].tolist()


async def test_exchange_filter_and_column_choice(repo, engine) -> None:
    await _insert(engine, [("AAA", T0 + i, "1", "2") for i in range(3)])
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        await raw.execute("UPDATE orderbook_data SET exchange = 'other' WHERE timestamp = $1", T0)
    frame = await repo.quotes("AAA", T0, T0 + 10, exchange="other")
    assert len(frame) == 1 and frame["exchange"].tolist() == ["other"]
    both = await repo.quotes("AAA", T0, T0 + 10, columns=["timestamp", "exchange", "bid_price"])
    assert list(both.columns) == ["timestamp", "exchange", "bid_price"]
    assert both["exchange"].tolist() == ["other", "binance-futures", "binance-futures"]


HOSTILE = [
    "x';DROP TABLE t;--",
    "a\\'b",
    "back\\slash\\",
    "semi;colon",
    "tab\there",
    "new\nline",
    "$1 $$ %s {}",
    "ü€😀",
    "' OR '1'='1",
]


async def test_hostile_symbols_are_bound_not_spliced(repo, engine) -> None:
    await _insert(engine, [(s, T0 + i, "1", "2") for i, s in enumerate(HOSTILE)])
    await _insert(engine, [("BTCUSDT", T0 + 100, "1", "2")])
    for i, symbol in enumerate(HOSTILE):
        frame = await repo.quotes(symbol, T0, T0 + DAY)
        assert frame["symbol"].tolist() == [symbol]
        assert _as_int_us(frame["timestamp"]).tolist() == [T0 + i]
    latest = await repo.latest(HOSTILE)
    assert sorted(latest["symbol"].tolist()) == sorted(HOSTILE)
    assert len(await repo.quotes("x" * 100_000, T0, T0 + DAY)) == 0
    for bad in ["nul\x00byte", "", 42, None]:
        with pytest.raises(ValueError, match="symbol"):
            await repo.quotes(bad, T0, T0 + DAY)
    assert await repo.count() == len(HOSTILE) + 1


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"start": T0 + 5, "end": T0 + 5}, "start"),
        ({"start": T0 + 6, "end": T0 + 5}, "start"),
        ({"start": "yesterday-ish", "end": T0}, "yesterday-ish"),
        ({"start": T0, "end": "2020-13-45"}, "2020-13-45"),
        ({"start": 1.5, "end": T0}, "1.5"),
        ({"start": np.datetime64("NaT"), "end": T0}, "NaT"),
        ({"start": T0, "end": T0 + 5, "output": "excel"}, "excel"),
        ({"start": T0, "end": T0 + 5, "columns": ["price"]}, "price"),
    ],
)
async def test_bad_input_raises_value_error_naming_the_value(repo, kwargs, named) -> None:
    with pytest.raises(ValueError, match=named):
        await repo.quotes("BTCUSDT", **kwargs)


async def test_range_query_uses_the_symbol_timestamp_index(engine, real_rows) -> None:
    plan = plan_quotes("BTCUSDT", T0, T0 + DAY)
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        async with raw.transaction():
            await raw.fetchval(_BIND_SQL, *plan.bind_args("BTCUSDT"))
            text = "\n".join(
                r[0] for r in await raw.fetch("EXPLAIN " + plan.copy_sql(order_by_id=False))
            )
            streamed = "\n".join(
                r[0] for r in await raw.fetch("EXPLAIN " + plan.copy_sql(order_by_id=True))
            )
    assert "idx_orderbook_symbol_timestamp" in text and "Seq Scan" not in text, text
    assert "idx_orderbook_symbol_timestamp" in streamed, streamed
    assert "BTCUSDT" not in plan.copy_sql(order_by_id=False)  # bound, not spliced


async def test_one_day_read_is_pruned_to_its_partition_when_planned(engine) -> None:
    """Bounds must be plan-time constants: with hundreds of daily partitions, planning them
    all and pruning only at run time costs tens of milliseconds per read."""
    tomorrow = dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=1)
    start_us = int(dt.datetime.combine(tomorrow, dt.time(), dt.timezone.utc).timestamp()) * 10**6
    plan = plan_quotes("BTCUSDT", start_us, start_us + DAY)
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        async with raw.transaction():
            await raw.fetchval(_BIND_SQL, *plan.bind_args("BTCUSDT"))
            text = "\n".join(
                r[0] for r in await raw.fetch("EXPLAIN " + plan.copy_sql(order_by_id=False))
            )
    words = text.replace('"', " ").split()
    scanned = {word for word in words if word.startswith("orderbook_data_")}
    assert scanned == {f"orderbook_data_p{tomorrow:%Y%m%d}"}, text
    assert "Subplans Removed" not in text, text


async def test_latest_is_correct(repo, engine, real_rows) -> None:
    # (Its plans, on partitions and on a plain table: tests/test_probes.py.)
    await _insert(engine, [(s, T0 + i, "1", "2") for i in range(200) for s in ("AAA", "ZZZ")])
    latest = await repo.latest()
    assert latest["symbol"].tolist() == ["AAA", "BTCUSDT", "ZZZ"]
    full = await repo.quotes(["AAA", "BTCUSDT", "ZZZ"], T0, T0 + DAY)
    expected = full.groupby("symbol", observed=True).tail(1).reset_index(drop=True)
    for column in ("timestamp", "ask_price", "bid_amount"):
        assert latest[column].tolist() == expected[column].tolist()
    some = await repo.latest("BTCUSDT", output="numpy")
    assert some["symbol"].tolist() == ["BTCUSDT"]
    assert len(await repo.latest(["NOSUCH"])) == 0


@pytest.mark.parametrize("by_range", [False, True])
async def test_asof_matches_pandas_merge_asof(repo, real_rows, by_range) -> None:
    # Few times are index probes; many (here: the threshold lowered) one bounded range read.
    repo._read_path.asof_range_min_times = 10 if by_range else 10**9
    full = await repo.quotes("BTCUSDT", T0, T0 + DAY)
    rng = np.random.default_rng(7)
    first, last = _as_int_us(full["timestamp"])[[0, -1]]
    times = sorted(rng.integers(first - 1_000_000, last + 1_000_000, 300).tolist())
    times += _as_int_us(full["timestamp"])[[5, 500, 5000]].tolist()  # exact hits, ties
    got = await repo.asof("BTCUSDT", times)
    left = pd.DataFrame({"time": pd.to_datetime(times, unit="us", utc=True).as_unit("us")})
    left["order"] = range(len(left))
    expected = pd.merge_asof(
        left.sort_values("time"),
        full,
        left_on="time",
        right_on="timestamp",
        direction="backward",
    ).sort_values("order")
    assert got["time"].tolist() == left["time"].tolist()
    for column in ("timestamp", "ask_price", "bid_price", "bid_amount"):
        a, b = got[column].to_numpy(), expected[column].to_numpy()
        assert ((a == b) | (pd.isna(a) & pd.isna(b))).all(), column
    assert got["timestamp"].isna().sum() > 0  # times before the first quote


async def test_resample_matches_pandas_on_the_full_frame(repo, real_rows) -> None:
    full = await repo.quotes("BTCUSDT", T0, T0 + DAY)
    got = await repo.resample("BTCUSDT", T0, T0 + DAY, "10s")
    mid = (full["ask_price"] + full["bid_price"]) / 2
    grouped = full.assign(mid=mid, spread=full["ask_price"] - full["bid_price"]).groupby(
        full["timestamp"].dt.floor("10s")
    )
    expected = pd.DataFrame(
        {
            "open": grouped["mid"].first(),
            "high": grouped["mid"].max(),
            "low": grouped["mid"].min(),
            "close": grouped["mid"].last(),
            "last_bid": grouped["bid_price"].last(),
            "last_ask": grouped["ask_price"].last(),
            "mean_spread": grouped["spread"].mean(),
            "quotes": grouped.size(),
        }
    )
    assert got["bucket"].tolist() == expected.index.tolist()
    assert got["quotes"].tolist() == expected["quotes"].tolist()
    for column in ("open", "high", "low", "close", "last_bid", "last_ask", "mean_spread"):
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-12, atol=1e-9)
    # Empty buckets are absent: a range with a gap gives no rows for it.
    gap = await repo.resample("BTCUSDT", T0 - 3_600_000_000, T0 + DAY, "1h")
    assert gap["quotes"].sum() == 9_999 and len(gap) == 1
    with pytest.raises(ValueError, match="fortnight"):
        await repo.resample("BTCUSDT", T0, T0 + DAY, "1fortnight")


async def test_iter_quotes_equals_quotes_in_chunks(repo, real_rows) -> None:
    whole = await repo.quotes("BTCUSDT", T0, T0 + DAY)
    chunks = [c async for c in repo.iter_quotes("BTCUSDT", T0, T0 + DAY, chunk_rows=1_000)]
    assert [len(c) for c in chunks] == [1_000] * 9 + [999]
    joined = pd.concat(chunks, ignore_index=True)
    for column in ("timestamp", "ask_price", "bid_amount"):
        assert joined[column].tolist() == whole[column].tolist()
    assert [c async for c in repo.iter_quotes("NOSUCH", T0, T0 + DAY)] == []
    stream = repo.iter_quotes("BTCUSDT", T0, T0 + DAY, chunk_rows=100)
    first = await stream.__anext__()
    await stream.aclose()  # leaving early cancels the COPY cleanly
    assert len(first) == 100
    assert await repo.count("BTCUSDT") == 9_999


@pytest.mark.slow
async def test_iter_quotes_streams_five_million_rows_in_flat_memory(repo, engine) -> None:
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        await raw.execute(
            "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp,"
            " ask_amount, ask_price, bid_price, bid_amount)"
            " SELECT 'BIGUSDT', $1::bigint + g, $1::bigint + g + 7, 1.25, 9682.5, 9681.92,"
            " 0.003 FROM generate_series(0, 4999999) g",
            T0,
        )
        await raw.execute("ANALYZE orderbook_data")
    process = psutil.Process()
    gc.collect()
    baseline = process.memory_info().rss
    peak = baseline
    rows = 0
    async for chunk in repo.iter_quotes("BIGUSDT", T0, T0 + DAY, chunk_rows=200_000):
        rows += len(chunk)
        peak = max(peak, process.memory_info().rss)
        del chunk
    assert rows == 5_000_000
    # The whole result as a DataFrame would be ~320 MB; streaming holds one 200k-row chunk
    # (~13 MB), a 2 MB batch and socket buffers. Bound: 150 MB over the baseline.
    assert peak - baseline < 150 * 2**20, (peak - baseline) / 2**20


@pytest.mark.parametrize("output", ["pandas", "polars", "arrow", "numpy"])
async def test_features_are_vectorized_on_every_output(repo, engine, output) -> None:
    await _insert(engine, [("AAA", T0, "100", "101"), ("AAA", T0 + 1, "99.5", "100.5")])
    frame = await repo.quotes("AAA", T0, T0 + 10, output=output)
    assert features.mid(frame).tolist() == [100.5, 100.0]
    assert features.spread(frame).tolist() == [1.0, 1.0]
    np.testing.assert_allclose(features.spread_bps(frame), [1e4 / 100.5, 100.0])
    # ask_amount 1.5, bid_amount 2.5 (see _insert)
    np.testing.assert_allclose(features.microprice(frame), [(100 * 1.5 + 101 * 2.5) / 4, 100.125])
    np.testing.assert_allclose(features.imbalance(frame), [0.25, 0.25])
    enriched = features.with_features(frame)
    names = {"arrow": lambda: enriched.column_names, "numpy": lambda: list(enriched)}.get(
        output, lambda: list(enriched.columns)
    )()
    assert names[-5:] == ["mid", "spread", "spread_bps", "microprice", "imbalance"]
    exact = await repo.quotes("AAA", T0, T0 + 10, output="numpy", exact=True)
    assert features.mid(exact).tolist() == [100.5, 100.0]


def test_csv_module_reads_the_file_like_pandas(real_quotes_path) -> None:
    rows = _file_rows(real_quotes_path)
    with gzip.open(real_quotes_path, "rb") as fh:
        frame = pd.read_csv(io.BytesIO(fh.read()), dtype=str)
    assert len(rows) == len(frame) == 9_999


async def test_two_connection_read_equals_one_connection_read(engine, real_rows) -> None:
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        # Enough rows that the second connection joins while the first is still reading.
        await raw.execute(
            "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp,"
            " ask_amount, ask_price, bid_price, bid_amount)"
            " SELECT s, $1::bigint + g * 7, $1::bigint + g * 7 + 3, 1.5, 100 + g * 0.01,"
            " 99 + g * 0.01, 2.5 FROM generate_series(0, 29999) g, unnest('{A,Z}'::text[]) s",
            T0,
        )
        # Statistics of these rows (symbols interleaved), not of an earlier test's.
        await raw.execute("ANALYZE orderbook_data")
    single, double = Reader(engine), Reader(engine)
    single.parallel = False
    double.parallel_min_rows = 1  # split every symbol in two, read on two connections
    for symbols in ("BTCUSDT", ["Z", "BTCUSDT", "A"]):
        one = await single.quotes(symbols, T0, T0 + DAY, output="numpy")
        two = await double.quotes(symbols, T0, T0 + DAY, output="numpy")
        if isinstance(symbols, list):  # six parts, 70k rows: the second one joins in time
            assert (single.last_read_connections, double.last_read_connections) == (1, 2)
        assert list(one) == list(two)
        for column in one:
            assert one[column].tolist() == two[column].tolist() or (
                one[column].dtype == np.float64 and one[column].tobytes() == two[column].tobytes()
            ), column
    parts, _, clustered = await _parts_of(double, engine, "BTCUSDT")
    assert len(parts) == 2 and parts[0].end_us == parts[1].start_us and not clustered


_SYMBOL_ROWS_SQL = (
    "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp,"
    " ask_amount, ask_price, bid_price, bid_amount)"
    " SELECT s, $1::bigint + g * 7, $1::bigint + g * 7 + 3, 1.5, 100 + g * 0.01,"
    " 99 + g * 0.01, 2.5 FROM {rows} ORDER BY {order}"
)


@pytest.mark.parametrize(
    ("order", "connections"),
    [("s, g", 1), ("g, s", 2)],
    ids=["stored-in-symbol-order", "symbols-interleaved"],
)
async def test_rows_stored_in_symbol_order_are_read_on_one_connection(
    engine, order, connections
) -> None:
    # A compacted partition holds each symbol's rows together: its index scan reads the heap
    # in order, and a second connection would only compete with the decoder for CPU.
    rows = "generate_series(0, 19999) g, unnest('{A,M,Z}'::text[]) s"
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        await raw.execute(_SYMBOL_ROWS_SQL.format(rows=rows, order=order), T0)
        await raw.execute("ANALYZE orderbook_data")
    single, reader = Reader(engine), Reader(engine)
    single.parallel = False
    reader.parallel_min_rows = 1
    for symbols in ("M", ["Z", "A", "M"]):
        one = await single.quotes(symbols, T0, T0 + DAY, output="numpy")
        got = await reader.quotes(symbols, T0, T0 + DAY, output="numpy")
        assert len(got["timestamp"]) == 20_000 * (1 if symbols == "M" else 3)
        assert list(one) == list(got)
        for column in one:
            assert one[column].tolist() == got[column].tolist(), column
        assert reader.last_read_connections == connections
    parts, estimate, clustered = await _parts_of(reader, engine, "M")
    assert clustered is (connections == 1)
    assert len(parts) == (1 if clustered else 2) and estimate > 10_000


async def _parts_of(reader: Reader, engine: AsyncEngine, symbol: str) -> tuple[list, int, bool]:
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        return await reader._parts(raw, plan_quotes(symbol, T0, T0 + DAY))


@pytest.mark.parametrize("output", ["polars", "arrow", "numpy"])
async def test_asof_before_the_first_quote_is_missing_in_every_output(repo, engine, output):
    await _insert(engine, [("AAA", T0 + 10, "1", "2")])
    got = await repo.asof("AAA", [T0, T0 + 10], output=output)
    repo._read_path.asof_range_min_times = 1
    assert str(await repo.asof("AAA", [T0, T0 + 10], output=output)) == str(got)
    if output == "polars":
        assert got["timestamp"].null_count() == 1 and got["bid_price"].is_nan().to_list()[0]
    elif output == "arrow":
        assert got.column("timestamp").null_count == 1
    else:
        assert np.isnat(got["timestamp"][0]) and got["timestamp"][1].astype(np.int64) == T0 + 10


async def test_exact_gives_decimals_in_every_output(repo, engine) -> None:
    await _insert(engine, [("AAA", T0, "9681.92", "9682.00000001")])
    expected_bid, expected_ask = Decimal("9681.92"), Decimal("9682.00000001")
    pandas_frame = await repo.quotes("AAA", T0, T0 + 1, exact=True)
    assert pandas_frame["bid_price"].tolist() == [expected_bid]
    polars_frame = await repo.quotes("AAA", T0, T0 + 1, output="polars", exact=True)
    assert polars_frame["ask_price"].to_list() == [expected_ask]
    table = await repo.quotes("AAA", T0, T0 + 1, output="arrow", exact=True)
    assert table.column("ask_price").type == pa.decimal128(20, 8)
    assert table.column("ask_price").to_pylist() == [expected_ask]
    empty = await repo.quotes("AAA", T0 + 1, T0 + 2, output="polars", exact=True)
    assert empty.schema == polars_frame.schema


async def test_a_busy_pool_does_not_hold_up_a_two_connection_read(settings, engine) -> None:
    await _insert(engine, [("AAA", T0 + i, "1", "2") for i in range(100)])
    # One pooled connection plus two overflow; a pool wait would last 600 s.
    small = create_engine(settings.model_copy(update={"pool_size": 1, "connect_timeout_s": 200}))
    try:
        reader = Reader(small)
        reader.parallel_min_rows = 1
        held = [await small.connect() for _ in range(2)]  # the collector, say, holds two
        try:
            frame = await asyncio.wait_for(reader.quotes("AAA", T0, T0 + DAY), 120)
        finally:
            for conn in held:
                await conn.close()
        assert len(frame) == 100
        assert reader.last_read_connections == 1  # the first connection read both parts
    finally:
        await small.dispose()
