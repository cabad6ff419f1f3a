"""Tiers benchmark: one symbol's 30 days read from the lake against the same read from PostgreSQL.

``--rows`` quotes of BTCUSDT (plus a third as many of each of three other symbols, interleaved
in time as a collector writes them) over 30 days of 2024, made by the server in day partitions
and compacted (``partitions compact``: the best PostgreSQL can do for this read). Then, in one
run:

1. ``repo.quotes("BTCUSDT", 30 days)`` from PostgreSQL, warm, best of ``--repeat``;
2. every day partition moved to a local-directory lake (``partitions prune`` with the lake,
   which archives each partition first) and the same call again, now answered from the lake's
   files;
3. the ratio, and bytes per row in the lake against PostgreSQL's heap and indexes.

The two results are checked equal (``assert_frame_equal``) before any time is reported.

    python -m benchmarks.tiers [--rows 1500000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import tempfile
import time
from pathlib import Path

import asyncpg
import pandas as pd

from benchmarks._common import bench_database, find_server
from orderbook_store.engine import create_engine
from orderbook_store.files.lake_store import open_lake
from orderbook_store.ops import compaction, partitions
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings

DAY = 86_400_000_000
DAYS = 30
T0 = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z

#: Rows in arrival order: every other one BTCUSDT, three other symbols sharing the rest.
FILL_SQL = """
INSERT INTO orderbook_data
    (symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price, bid_amount)
SELECT CASE WHEN g % 2 = 0 THEN 'BTCUSDT'
            ELSE (ARRAY['ETHUSDT', 'SOLUSDT', 'BNBUSDT'])[1 + (g / 2) % 3] END,
       {start} + g::bigint * {span} / {n},
       {start} + g::bigint * {span} / {n} + 900 + g % 997,
       round((random() * 10)::numeric, 3),
       round((42000 + random() * 100)::numeric, 1),
       round((41990 + random() * 100)::numeric, 1),
       round((random() * 10)::numeric, 3)
FROM generate_series(0, {n} - 1) AS g
"""


async def _best(read: object, repeat: int) -> tuple[float, pd.DataFrame]:
    best = float("inf")
    frame = None
    for _ in range(repeat):
        began = time.perf_counter()
        frame = await read()  # type: ignore[operator]
        best = min(best, time.perf_counter() - began)
    assert isinstance(frame, pd.DataFrame)
    return best, frame


async def run(url: str, rows: int, repeat: int) -> None:
    lake_dir = Path(tempfile.mkdtemp(prefix="obs_bench_lake_"))
    settings = Settings(database_url=url, pool_size=4, lake_url=str(lake_dir))
    engine = create_engine(settings)
    total = rows * 2
    try:
        await partitions.ensure(
            engine,
            ahead=0,
            period="day",
            since=dt.date(2024, 1, 1),
            today=dt.date(2024, 1, DAYS),
        )
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(FILL_SQL.format(start=T0, span=DAYS * DAY, n=total))
        finally:
            await conn.close()
        await compaction.compact(engine, now=dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc))
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("VACUUM ANALYZE orderbook_data")
            pg_bytes = await conn.fetchval(
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_inherits i"
                " JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'orderbook_data'::regclass"
                " AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'"
            )
        finally:
            await conn.close()
        async with OrderbookRepository(engine, settings=settings) as repo:

            def read() -> object:
                return repo.quotes("BTCUSDT", T0, T0 + DAYS * DAY)

            pg_s, stored = await _best(read, repeat)
            lake = open_lake(settings)
            assert lake is not None
            began = time.perf_counter()
            pruned = await partitions.prune(engine, partitions.from_us(T0 + DAYS * DAY), lake=lake)
            moved = pruned.rows
            moved_s = time.perf_counter() - began
            lake_s, from_lake = await _best(read, repeat)
        pd.testing.assert_frame_equal(from_lake, stored, check_exact=True)
        lake_bytes = sum(p.stat().st_size for p in lake_dir.rglob("*.parquet"))
        n = len(stored)
        print(f"tiers: BTCUSDT, {DAYS} days, {n:,} rows of {moved:,} (compacted day partitions)")
        print(f"  PostgreSQL (compacted)   {pg_s:7.3f} s  {n / pg_s:12,.0f} rows/s")
        print(f"  lake (local directory)   {lake_s:7.3f} s  {n / lake_s:12,.0f} rows/s")
        print(f"  lake / PostgreSQL speed  {pg_s / lake_s:7.2f}x (target >= 2x)")
        print(
            f"  bytes per row: lake {lake_bytes / moved:.1f}, PostgreSQL heap + indexes"
            f" {int(pg_bytes) / moved:.1f} (1/{int(pg_bytes) / lake_bytes:.1f}; target <= 1/15)"
        )
        print(f"  (archiving and pruning the {DAYS} partitions: {moved_s:.1f} s)")
    finally:
        await engine.dispose()
        for path in sorted(lake_dir.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        lake_dir.rmdir()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_500_000, help="BTCUSDT rows")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with find_server() as (server_url, _where), bench_database(server_url) as url:
        asyncio.run(run(url, args.rows, args.repeat))


if __name__ == "__main__":
    main()
