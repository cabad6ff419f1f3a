"""Read benchmark: one symbol's 1,000,000-row range to a float64 DataFrame, every way, one run.

A table of 2,000,000 quotes over 4 symbols (BTCUSDT 1,000,000, interleaved in time with three
others, as a collector writes them), at Alembic head with its indexes. Each line reads the same
rows (BTCUSDT, the whole range) and reports seconds, rows/s and the ratio to the first line:

1. ``pandas.read_sql`` of the plain SELECT (``Decimal`` values, converted to float64 after);
2. ``pandas.read_sql`` with ``::float8`` casts (the server converts);
3. connectorx ``read_sql`` to pandas and to Arrow (``::float8`` casts);
4. ``repo.quotes(output="pandas" | "polars" | "numpy")``, and the sync facade;
5. ``psql \\copy (the reader's query) TO '/dev/null'``: the server's own ceiling.

Then the memory of ``iter_quotes`` against one whole ``quotes()`` (peak RSS added, each in a
fresh process).

The server is found as the tests find it: ``TEST_DATABASE_URL``, else 127.0.0.1:5432, else a
private embedded PostgreSQL. The benchmark creates its own database and drops it at the end.

    python -m benchmarks.read [--rows 2000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import asyncpg
import numpy as np
import pandas as pd
import psutil
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from benchmarks._common import bench_database, find_server, psql_binary
from orderbook_store.engine import create_engine
from orderbook_store.models import DECIMAL_COLUMNS
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.sync import connect

ROOT = Path(__file__).resolve().parent.parent
CEILING = "psql \\copy (same query) TO /dev/null (ceiling)"
SYMBOL = "BTCUSDT"
T0 = 1582329600000000
END = T0 + 10**13
WHERE = f"FROM orderbook_data WHERE symbol = '{SYMBOL}' AND timestamp >= {T0} AND timestamp < {END}"
PLAIN_SQL = (
    "SELECT exchange, symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price,"
    f" bid_amount {WHERE} ORDER BY symbol, timestamp, id"
)
FLOAT_SQL = (
    "SELECT exchange, symbol, timestamp, local_timestamp, ask_amount::float8 AS ask_amount,"
    " ask_price::float8 AS ask_price, bid_price::float8 AS bid_price,"
    f" bid_amount::float8 AS bid_amount {WHERE} ORDER BY symbol, timestamp, id"
)
CEILING_SQL = (
    "SELECT timestamp, id, local_timestamp, ask_amount, ask_price, bid_price, bid_amount,"
    f" exchange {WHERE} ORDER BY timestamp"
)


async def fill(url: str, rows: int) -> None:
    """Half the rows BTCUSDT, the rest spread over three symbols, interleaved in time."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp,"
            " ask_amount, ask_price, bid_price, bid_amount)"
            " SELECT CASE WHEN g % 2 = 0 THEN 'BTCUSDT' WHEN g % 6 = 1 THEN 'ETHUSDT'"
            "  WHEN g % 6 = 3 THEN 'BNBUSDT' ELSE 'SOLUSDT' END,"
            f" {T0} + (g / 2) * 1000 + g % 5, {T0} + (g / 2) * 1000 + 2500 + g % 97,"
            " round((random() * 5)::numeric, 3), round((9000 + random() * 1000)::numeric, 2),"
            " round((9000 + random() * 1000)::numeric, 2), round((random() * 50)::numeric, 8)"
            f" FROM generate_series(0, {rows - 1}) g"
        )
        await conn.execute("VACUUM ANALYZE orderbook_data")
    finally:
        await conn.close()


def psql_ceiling(settings: Settings) -> None:
    """The reader's query, same plan settings, written by psql to /dev/null."""
    env = dict(os.environ, PGSSLMODE=settings.sslmode)
    if settings.password is not None:
        env["PGPASSWORD"] = settings.password.get_secret_value()
    subprocess.run(
        [psql_binary(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", settings.host,
         "-p", str(settings.port), "-U", settings.user, "-d", settings.name,
         "-c", "SET jit = off; SET enable_bitmapscan = off; SET enable_seqscan = off",
         "-c", f"\\copy ({CEILING_SQL}) TO '/dev/null'"],
        env=env, check=True, timeout=600,
    )  # fmt: skip


async def _make_engine(settings: Settings) -> AsyncEngine:
    return create_engine(settings)


def _floats(frame: pd.DataFrame) -> pd.DataFrame:
    for column in DECIMAL_COLUMNS:
        frame[column] = frame[column].astype(np.float64)
    return frame


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="best of N (read_sql plain: 1)")
    parser.add_argument("--memory-child", choices=["stream", "whole"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.url, args.memory_child)
        return
    import connectorx as cx

    with find_server() as (server_url, where), bench_database(server_url) as url:
        settings = Settings(database_url=url, pool_size=2)
        print(f"read benchmark on {where}: filling {args.rows:,} rows over 4 symbols ...")
        asyncio.run(fill(url, args.rows))
        cx_url = url.split("?")[0]
        expected = args.rows // 2

        async def read_sql(sql: str) -> pd.DataFrame:
            engine = create_engine(settings)
            try:
                async with engine.connect() as conn:
                    return await conn.run_sync(lambda c: pd.read_sql(text(sql), c))
            finally:
                await engine.dispose()

        # One loop and one engine for every repo.quotes() line, as an application keeps them:
        # the pool's connections are opened once, not timed with each read.
        loop = asyncio.new_event_loop()
        engine = loop.run_until_complete(_make_engine(settings))
        repo = OrderbookRepository(engine)

        def quotes(output: str) -> object:
            read = repo.quotes(SYMBOL, T0, END, output=output)  # type: ignore[call-overload]
            return loop.run_until_complete(read)

        store = connect(settings)
        cases: list[tuple[str, Callable[[], object], int]] = [
            ("pandas.read_sql, plain SELECT (Decimal->float64)",
             lambda: _floats(asyncio.run(read_sql(PLAIN_SQL))), 1),
            ("pandas.read_sql, ::float8", lambda: asyncio.run(read_sql(FLOAT_SQL)), args.repeat),
            ("connectorx read_sql -> pandas (::float8)",
             lambda: cx.read_sql(cx_url, FLOAT_SQL, return_type="pandas"), args.repeat),
            ("connectorx read_sql -> arrow (::float8)",
             lambda: cx.read_sql(cx_url, FLOAT_SQL, return_type="arrow"), args.repeat),
            ('repo.quotes(output="pandas")', lambda: quotes("pandas"), args.repeat),
            ('repo.quotes(output="polars")', lambda: quotes("polars"), args.repeat),
            ('repo.quotes(output="numpy")', lambda: quotes("numpy"), args.repeat),
            ("sync facade store.quotes() -> pandas",
             lambda: store.quotes(SYMBOL, T0, T0 + 10**13), args.repeat),
            (CEILING, lambda: psql_ceiling(settings), args.repeat),
        ]  # fmt: skip
        results: dict[str, float] = {}
        first: float | None = None
        for name, run, repeat in cases:
            best = float("inf")
            for _ in range(max(1, repeat)):
                gc.collect()
                started = time.perf_counter()
                result = run()
                best = min(best, time.perf_counter() - started)
                if result is not None:
                    size = len(result["timestamp"]) if isinstance(result, dict) else len(result)  # type: ignore[arg-type]
                    assert size == expected, (name, size)
                del result
            results[name] = best
            first = first or best
            print(
                f"  {name:50s} {best:7.3f} s {expected / best:>12,.0f} rows/s {first / best:6.2f}x",
                flush=True,
            )
        cx_time = results["connectorx read_sql -> pandas (::float8)"]
        ours = results['repo.quotes(output="pandas")']
        print(
            f"  quotes() to pandas: {results[next(iter(results))] / ours:.2f}x pandas.read_sql, "
            f"{cx_time / ours:.2f}x connectorx, "
            f"{results[CEILING] / ours:.2f} of the ceiling"
        )
        store.close()
        loop.run_until_complete(engine.dispose())
        loop.close()
        memory_lines(url)


def memory_child(url: str, mode: str) -> None:
    """In a fresh process: peak RSS added by streaming vs by one whole frame."""
    store = connect(Settings(database_url=url, pool_size=2))
    store.quotes(SYMBOL, T0, T0 + 1_000)  # imports, pool and codecs warmed up first
    gc.collect()
    process = psutil.Process()
    base = process.memory_info().rss
    # ru_maxrss survives exec (it would show the parent's peak): sample RSS instead.
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.002):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if mode == "stream":
        for chunk in store.iter_quotes(SYMBOL, T0, END, chunk_rows=100_000):
            del chunk
    else:
        frame = store.quotes(SYMBOL, T0, END)
        del frame
    done.set()
    sampler.join()
    store.close()
    print(f"{(peak - base) / 2**20:.0f}")


def memory_lines(url: str) -> None:
    """Peak RSS added by iter_quotes (100k-row chunks) vs one whole quotes() frame."""
    added = {}
    for mode in ("stream", "whole"):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.read", "--memory-child", mode, "--url", url],
            cwd=ROOT, capture_output=True, text=True, check=True, timeout=600,
        )  # fmt: skip
        added[mode] = out.stdout.strip().splitlines()[-1]
    print(
        f"  iter_quotes(chunk_rows=100_000) of the 1M rows: peak RSS +{added['stream']} MB;"
        f" one quotes() frame of them: +{added['whole']} MB"
    )


if __name__ == "__main__":
    main()
