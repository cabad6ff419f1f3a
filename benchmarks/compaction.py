"""Compaction benchmark: what a writer feels during ``partitions compact``, and what reads gain.

A plain table of ``--rows`` quotes (``--symbols`` symbols interleaved in arrival order over
``--days`` days of 2024, made by the server with ``generate_series``) is upgraded to head, which
adopts it as one historical partition. Then:

1. before: a one-symbol read of every day, and of one day: blocks touched per 1,000 rows
   (``EXPLAIN (ANALYZE, BUFFERS)``, table and index) and the warm time of ``repo.quotes``
   (best of ``--repeat``);
2. ``orderbook-store partitions compact --json`` runs as its own process (as cron runs it) while
   a probe inserts one row every 20 ms: the probe's longest insert is the stall writers feel;
   the swap's own lock time comes from the command's summary;
3. after: the same reads; then one more closed day is filled in arrival order and compacted in
   place (the daily case), probed the same way.

Needs about 2.5x the table's size on disk while the sorted copy exists (~600 bytes a row in
all). ``--private-server`` runs a server of its own on a free port instead of the one the tests
find (nothing else competes for the disk and the locks).

    python -m benchmarks.compaction [--rows 3000000] [--symbols 20] [--days 30] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from benchmarks._common import bench_database, find_server
from orderbook_store.engine import create_engine
from orderbook_store.ops import migrations, partitions
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings

DAY_US = 86_400_000_000
T0 = partitions.to_us(dt.date(2024, 1, 1))
PROJECT = Path(__file__).resolve().parent.parent

FILL_SQL = """
INSERT INTO orderbook_data
    (symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price, bid_amount)
SELECT 'S' || lpad((g % {symbols})::text, 2, '0') || 'USDT',
       {t0} + g::bigint * {span} / {rows},
       {t0} + g::bigint * {span} / {rows} + 2500 + g % 97,
       round((random() * 5)::numeric, 3), round((40000 + random() * 1000)::numeric, 1),
       round((40000 + random() * 1000)::numeric, 1), round((random() * 50)::numeric, 8)
FROM generate_series(0, {rows} - 1) AS g
"""

SYMBOL = "S07USDT"


async def execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def blocks_per_1000_rows(url: str, lo: int, hi: int) -> float:
    conn = await asyncpg.connect(url)
    try:
        plan = await conn.fetchval(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM orderbook_data "
            f"WHERE symbol = '{SYMBOL}' AND timestamp >= {lo} AND timestamp < {hi} "
            "ORDER BY timestamp"
        )
    finally:
        await conn.close()
    top = json.loads(plan)[0]["Plan"]
    blocks = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
    return 1000 * blocks / max(top["Actual Rows"], 1)


async def read_time(url: str, lo: int, hi: int, repeat: int) -> tuple[float, int]:
    engine = create_engine(Settings(database_url=url, pool_size=2))
    try:
        async with OrderbookRepository(engine) as repo:
            rows = len(await repo.quotes(SYMBOL, lo, hi))  # warm
            best = float("inf")
            for _ in range(repeat):
                started = time.perf_counter()
                await repo.quotes(SYMBOL, lo, hi)
                best = min(best, time.perf_counter() - started)
            return best, rows
    finally:
        await engine.dispose()


async def measure(url: str, days: int, repeat: int) -> dict[str, float]:
    await execute(url, "VACUUM ANALYZE orderbook_data")
    whole, day = (T0, T0 + days * DAY_US), (T0 + 14 * DAY_US, T0 + 15 * DAY_US)
    whole_s, whole_rows = await read_time(url, *whole, repeat)
    day_s, _ = await read_time(url, *day, repeat)
    conn = await asyncpg.connect(url)
    try:
        size = await conn.fetchval(
            "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('orderbook_data')"
        )
        rows = await conn.fetchval("SELECT count(*) FROM orderbook_data")
    finally:
        await conn.close()
    return {
        "blocks_per_1000_rows": await blocks_per_1000_rows(url, *whole),
        "one_day_blocks_per_1000_rows": await blocks_per_1000_rows(url, *day),
        "read_all_days_rows_per_s": whole_rows / whole_s,
        "read_one_day_ms": day_s * 1000,
        "bytes_per_row": size / rows,
    }


async def probe(url: str, stop: asyncio.Event) -> list[float]:
    """Insert one row of today every 20 ms until ``stop``; each insert's seconds."""
    conn = await asyncpg.connect(url)
    latencies: list[float] = []
    try:
        while not stop.is_set():
            now_us = int(time.time() * 1e6)
            started = time.perf_counter()
            await conn.execute(
                "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp, ask_price) "
                f"VALUES ('PROBEUSDT', {now_us}, {now_us}, 1)"
            )
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    return latencies


async def compact_probed(url: str) -> dict[str, object]:
    stop = asyncio.Event()
    probing = asyncio.create_task(probe(url, stop))
    await asyncio.sleep(0.5)
    started = time.perf_counter()
    run = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orderbook_store",
        "partitions",
        "compact",
        "--json",
        cwd=PROJECT,
        env={**os.environ, "DATABASE_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await run.communicate()
    took = time.perf_counter() - started
    await asyncio.sleep(0.5)
    stop.set()
    latencies = await probing
    if run.returncode != 0:
        raise SystemExit(f"compact failed: {err.decode()}")
    summary = json.loads(out.decode().strip().splitlines()[-1])
    return {
        "seconds": took,
        "partitions": sum(len(c["partitions"]) for c in summary["compacted"]),
        "rows": summary["rows"],
        "swap_lock_ms": summary["longest_lock_s"] * 1000,
        "probe_inserts": len(latencies),
        "probe_longest_ms": max(latencies) * 1000,
        "probe_p99_ms": statistics.quantiles(latencies, n=100)[98] * 1000,
        "probe_median_ms": statistics.median(latencies) * 1000,
    }


@contextlib.contextmanager
def server(private: bool) -> Iterator[str]:
    if not private:
        with find_server() as (url, _where):
            yield url
        return
    from pgserver import TemporaryPostgres

    with TemporaryPostgres(extra_conf={"shared_buffers": "256MB"}) as pg:
        yield pg.url()


async def run(url: str, rows: int, symbols: int, days: int, repeat: int) -> None:
    print(f"{rows:,} rows, {symbols} symbols interleaved, {days} days")
    await execute(url, FILL_SQL.format(symbols=symbols, t0=T0, span=days * DAY_US, rows=rows))
    await execute(url, "VACUUM ANALYZE orderbook_data")
    started = time.perf_counter()
    await asyncio.to_thread(migrations.upgrade, Settings(database_url=url), "head")
    print(f"upgraded to head in {time.perf_counter() - started:.1f} s")
    before = await measure(url, days, repeat)
    compacted = await compact_probed(url)
    after = await measure(url, days, repeat)
    print(f"\ncompaction of the adopted history: {json.dumps(compacted, indent=1)}")
    print(f"\n{'':34} {'before':>10} {'after':>10} {'after/before':>13}")
    for key in before:
        print(f"{key:34} {before[key]:10.1f} {after[key]:10.1f} {after[key] / before[key]:13.3f}")

    # The daily case: one more closed day, filled in arrival order, compacted in place.
    day = T0 + days * DAY_US
    engine = create_engine(Settings(database_url=url, pool_size=2))
    try:
        await partitions.ensure(
            engine, ahead=0, since=partitions.day_of(day), today=partitions.day_of(day)
        )
    finally:
        await engine.dispose()
    await execute(url, FILL_SQL.format(symbols=symbols, t0=day, span=DAY_US, rows=rows // days))
    daily = await compact_probed(url)
    print(f"\ncompaction of one day in place: {json.dumps(daily, indent=1)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--symbols", type=int, default=20)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--private-server", action="store_true")
    args = parser.parse_args()
    with server(args.private_server) as url, bench_database(url, "0003") as db:
        asyncio.run(run(db, args.rows, args.symbols, args.days, args.repeat))


if __name__ == "__main__":
    main()
