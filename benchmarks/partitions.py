"""Partitions benchmark: a one-day read and dropping one day, plain table vs daily partitions.

The same quotes (30 days x 4 symbols, made by the server with ``generate_series``) are loaded
into two databases: one at revision 0003 (the plain table) and one at head with a partition per
day (``partitions.ensure``). Then, in each:

1. a one-day read of one symbol with ``repo.quotes`` (best of ``--repeat``), and of all four;
   then the same rows as a bare ``COPY (SELECT ...) TO STDOUT`` with the time bounds read from
   ``current_setting`` (as the reader binds them: pruned at run time, after planning every
   partition) and as literals (pruned at plan time);
2. dropping the oldest day: ``DELETE`` on the plain table (and the ``VACUUM`` it leaves owed)
   vs ``partitions.prune`` (detach + drop) on the partitioned one.

Ratios are plain time / partitioned time (above 1: partitions are faster). The server is found
as the tests find it; both databases are created here and dropped at the end.

    python -m benchmarks.partitions [--rows 2000000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from benchmarks._common import bench_database, find_server
from orderbook_store.engine import create_engine
from orderbook_store.ops import partitions
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings

DAY_US = 86_400_000_000
START = dt.date(2024, 1, 1)
T0 = partitions.to_us(START)
DAYS = 30
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT")

FILL_SQL = """
INSERT INTO orderbook_data
    (symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price, bid_amount)
SELECT (ARRAY['BTCUSDT', 'ETHUSDT', 'SOLUSDT', 'BNBUSDT'])[1 + g % 4],
       {t0} + g::bigint * {span} / {rows},
       {t0} + g::bigint * {span} / {rows} + 2500 + g % 97,
       round((random() * 5)::numeric, 3), round((40000 + random() * 1000)::numeric, 1),
       round((40000 + random() * 1000)::numeric, 1), round((random() * 50)::numeric, 8)
FROM generate_series(0, {rows} - 1) AS g
"""


async def execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def fill(url: str, rows: int, *, partitioned: bool) -> None:
    if partitioned:
        engine = create_engine(Settings(database_url=url, pool_size=2))
        try:
            await partitions.ensure(engine, ahead=DAYS, today=START)
        finally:
            await engine.dispose()
    await execute(url, FILL_SQL.format(t0=T0, span=DAYS * DAY_US, rows=rows))
    await execute(url, "VACUUM ANALYZE orderbook_data")


async def best_of(repeat: int, work: Callable[[], Awaitable[int]]) -> tuple[float, int]:
    best, rows = float("inf"), 0
    for _ in range(repeat):
        started = time.perf_counter()
        rows = await work()
        best = min(best, time.perf_counter() - started)
    return best, rows


async def one_day_reads(url: str, repeat: int) -> tuple[tuple[float, int], tuple[float, int]]:
    day = (T0 + 14 * DAY_US, T0 + 15 * DAY_US)
    engine = create_engine(Settings(database_url=url, pool_size=2))
    try:
        async with OrderbookRepository(engine) as repo:

            async def one() -> int:
                return len(await repo.quotes("BTCUSDT", *day))

            async def four() -> int:
                return len(await repo.quotes(list(SYMBOLS), *day))

            await one()  # warm the pool and the cache alike for both tables
            return await best_of(repeat, one), await best_of(repeat, four)
    finally:
        await engine.dispose()


COPY_SQL = (
    "SELECT timestamp, id, local_timestamp, ask_amount, ask_price, bid_price, bid_amount"
    " FROM orderbook_data WHERE symbol = 'BTCUSDT' AND timestamp >= {lo} AND timestamp < {hi}"
    " ORDER BY timestamp"
)


async def copy_reads(url: str, repeat: int) -> tuple[float, float]:
    """Best times of the one-day COPY with bounds from ``current_setting`` and as literals."""
    lo, hi = T0 + 14 * DAY_US, T0 + 15 * DAY_US
    settings_sql = COPY_SQL.format(
        lo="current_setting('bench.lo')::bigint", hi="current_setting('bench.hi')::bigint"
    )
    literal_sql = COPY_SQL.format(lo=lo, hi=hi)
    conn = await asyncpg.connect(url)

    async def sink(chunk: bytes) -> None:
        pass

    try:
        await conn.execute(f"SET bench.lo = '{lo}'; SET bench.hi = '{hi}'")
        times = []
        for sql in (settings_sql, literal_sql):

            async def copy(sql: str = sql) -> int:
                await conn.copy_from_query(sql, output=sink)
                return 0

            await copy()
            times.append((await best_of(repeat, copy))[0])
        return times[0], times[1]
    finally:
        await conn.close()


async def partition_count(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'orderbook_data'::regclass"
            )
        )
    finally:
        await conn.close()


async def drop_day_plain(url: str) -> tuple[float, float]:
    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        await conn.execute(
            f'DELETE FROM orderbook_data WHERE "timestamp" >= {T0} AND "timestamp" < {T0 + DAY_US}'
        )
        deleted = time.perf_counter() - started
        started = time.perf_counter()
        await conn.execute("VACUUM orderbook_data")
        return deleted, time.perf_counter() - started
    finally:
        await conn.close()


async def drop_day_partitioned(url: str) -> float:
    engine = create_engine(Settings(database_url=url, pool_size=2))
    try:
        started = time.perf_counter()
        result = await partitions.prune(engine, START + dt.timedelta(days=1), confirm=True)
        elapsed = time.perf_counter() - started
        assert result.dropped == [f"orderbook_data_p{START:%Y%m%d}"], result.dropped
        return elapsed
    finally:
        await engine.dispose()


def _line(label: str, seconds: float, extra: str = "") -> None:
    print(f"  {label:<66} {seconds * 1000:9.1f} ms  {extra}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print times and ratios."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    with (
        find_server() as (server_url, where),
        bench_database(server_url, "0003") as plain_url,
        bench_database(server_url, "head") as part_url,
    ):
        asyncio.run(fill(plain_url, args.rows, partitioned=False))
        asyncio.run(fill(part_url, args.rows, partitioned=True))
        print(
            f"partitions benchmark on {where}: {args.rows:,} rows, {DAYS} days x "
            f"{len(SYMBOLS)} symbols, in a plain table and in daily partitions "
            f"({asyncio.run(partition_count(part_url))} partitions)"
        )

        (plain_one, rows_one), (plain_four, rows_four) = asyncio.run(
            one_day_reads(plain_url, args.repeat)
        )
        (part_one, _), (part_four, _) = asyncio.run(one_day_reads(part_url, args.repeat))
        _line(f"one-day read, 1 symbol ({rows_one:,} rows), plain", plain_one)
        _line("one-day read, 1 symbol, partitioned", part_one, f"{plain_one / part_one:.2f}x")
        _line(f"one-day read, 4 symbols ({rows_four:,} rows), plain", plain_four)
        _line("one-day read, 4 symbols, partitioned", part_four, f"{plain_four / part_four:.2f}x")

        plain_settings, plain_literal = asyncio.run(copy_reads(plain_url, args.repeat))
        part_settings, part_literal = asyncio.run(copy_reads(part_url, args.repeat))
        _line("one-day COPY, 1 symbol, bounds by current_setting, plain", plain_settings)
        _line(
            "one-day COPY, 1 symbol, bounds by current_setting, partitioned",
            part_settings,
            f"{plain_settings / part_settings:.2f}x",
        )
        _line("one-day COPY, 1 symbol, literal bounds, plain", plain_literal)
        _line(
            "one-day COPY, 1 symbol, literal bounds, partitioned",
            part_literal,
            f"{plain_literal / part_literal:.2f}x",
        )

        deleted, vacuumed = asyncio.run(drop_day_plain(plain_url))
        pruned = asyncio.run(drop_day_partitioned(part_url))
        _line("drop one day, plain: DELETE", deleted)
        _line("  ... and the VACUUM it leaves owed", vacuumed)
        _line(
            "drop one day, partitioned: prune (detach + drop)",
            pruned,
            f"{deleted / pruned:.1f}x vs DELETE, {(deleted + vacuumed) / pruned:.1f}x with VACUUM",
        )


if __name__ == "__main__":
    main()
