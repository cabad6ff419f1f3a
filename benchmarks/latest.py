"""latest() benchmark: every symbol's last quote, plain table vs daily partitions.

The same quotes (``--per-day`` per symbol per day, 20 symbols, from 2024-01-01) are loaded into
a database at revision 0003 (the plain table) and one at head with a partition per day
(``partitions.ensure``), for 30 and for 365 days. In each, ``repo.latest()`` of every symbol,
best of ``--repeat``; on the partitioned table also the same answer found the way a database
from before revision 0006 finds its symbols (a skip scan of every partition), the answer while
two more symbols are listed whose only partition was dropped (they yield nothing and walk every
partition), how long ``prune``'s forgetting of them takes (a check, then the same check of the
symbols found under the lock writers wait for), and the answer after. Ratios are time / the
plain table's time (1.00x: as fast as the plain table).

    python -m benchmarks.latest [--per-day 100] [--repeat 7] [--days 30 365]
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
from orderbook_store.ops.symbols import forget_unstored_symbols
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings

DAY_US = 86_400_000_000
START = dt.date(2024, 1, 1)
T0 = partitions.to_us(START)
SYMBOLS = 20

FILL_SQL = """
INSERT INTO orderbook_data
    (symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price, bid_amount)
SELECT 'SYM' || lpad(s::text, 2, '0') || 'USDT',
       {t0} + d::bigint * {day} + g::bigint * ({day} / {per_day}) + s,
       {t0} + d::bigint * {day} + g::bigint * ({day} / {per_day}) + s + 2500,
       1.5, 43000.1, 43000.0, 2.25
FROM generate_series(0, {days} - 1) AS d, generate_series(0, {per_day} - 1) AS g,
     generate_series(1, {symbols}) AS s
ORDER BY d, g, s
"""

#: Two symbols stored only on the first day, whose partition is then dropped by hand (so they
#: stay listed until ``prune`` forgets them).
GONE_SQL = """
INSERT INTO orderbook_data (symbol, timestamp, local_timestamp)
VALUES ('GONE1USDT', {t0} + 1, {t0} + 2), ('GONE2USDT', {t0} + 3, {t0} + 4);
ALTER TABLE orderbook_data DETACH PARTITION orderbook_data_p{first:%Y%m%d};
DROP TABLE orderbook_data_p{first:%Y%m%d};
"""


async def execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def fill(url: str, days: int, per_day: int, *, partitioned: bool) -> None:
    if partitioned:
        engine = create_engine(Settings(database_url=url, pool_size=2))
        try:
            await partitions.ensure(engine, ahead=days - 1, today=START)
        finally:
            await engine.dispose()
    await execute(
        url,
        FILL_SQL.format(t0=T0, day=DAY_US, days=days, per_day=per_day, symbols=SYMBOLS),
    )
    await execute(url, "VACUUM ANALYZE orderbook_data")


async def best_of(repeat: int, work: Callable[[], Awaitable[int]]) -> tuple[float, int]:
    best, rows = float("inf"), 0
    for _ in range(repeat):
        started = time.perf_counter()
        rows = await work()
        best = min(best, time.perf_counter() - started)
    return best, rows


async def time_latest(url: str, repeat: int) -> tuple[float, int]:
    """Best time of ``repo.latest()``, and how many symbols it returned."""
    engine = create_engine(Settings(database_url=url, pool_size=2))
    try:
        async with OrderbookRepository(engine) as repo:

            async def once() -> int:
                return len(await repo.latest())

            return await best_of(repeat, once)
    finally:
        await engine.dispose()


async def time_unlisted(url: str, repeat: int) -> tuple[float, int]:
    """``time_latest`` with the list of symbols out of sight, as before revision 0006."""
    await execute(url, "ALTER TABLE orderbook_symbols RENAME TO orderbook_symbols_aside")
    try:
        return await time_latest(url, repeat)
    finally:
        await execute(url, "ALTER TABLE orderbook_symbols_aside RENAME TO orderbook_symbols")


async def measure(plain: str, parted: str, days: int, per_day: int, repeat: int) -> None:
    """Fill both databases, time latest() in each, print the lines of ``days``."""
    await fill(plain, days, per_day, partitioned=False)
    await fill(parted, days, per_day, partitioned=True)
    plain_s, plain_n = await time_latest(plain, repeat)
    listed_s, listed_n = await time_latest(parted, repeat)
    skip_s, skip_n = await time_unlisted(parted, repeat)
    assert plain_n == listed_n == skip_n == SYMBOLS, (plain_n, listed_n, skip_n)
    await execute(parted, GONE_SQL.format(t0=T0, first=START))
    gone_s, gone_n = await time_latest(parted, repeat)
    assert gone_n == SYMBOLS, gone_n
    engine = create_engine(Settings(database_url=parted, pool_size=2))
    try:
        started = time.perf_counter()
        forgotten = await forget_unstored_symbols(engine)
        forget_s = time.perf_counter() - started
    finally:
        await engine.dispose()
    assert forgotten == ["GONE1USDT", "GONE2USDT"], forgotten
    after_s, after_n = await time_latest(parted, repeat)
    assert after_n == SYMBOLS, after_n
    lines = [
        ("plain table", plain_s),
        ("partitioned, listed symbols", listed_s),
        ("partitioned, skip scan (before 0006)", skip_s),
        ("+ 2 listed symbols no longer stored", gone_s),
        ("prune forgetting them (2 checks)", forget_s),
        ("partitioned, after that", after_s),
    ]
    for label, seconds in lines:
        print(f"  {days:>3} days: {label:<38} {seconds * 1e3:8.2f} ms  {seconds / plain_s:6.2f}x")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print times and ratios."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--per-day", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--days", type=int, nargs="+", default=[30, 365])
    args = parser.parse_args(argv)
    with find_server() as (server_url, where):
        print(
            f"latest(): {SYMBOLS} symbols x {args.per_day} quotes a day ({where}), "
            f"best of {args.repeat}; ratio = time / plain table's time"
        )
        for days in args.days:
            with (
                bench_database(server_url, "0003") as plain,
                bench_database(server_url) as parted,
            ):
                asyncio.run(measure(plain, parted, days, args.per_day, args.repeat))


if __name__ == "__main__":
    main()
