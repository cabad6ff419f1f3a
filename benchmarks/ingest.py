"""Ingest benchmark: rows/s of every way into ``orderbook_data``, as ratios to the original plan.

One run on the same generated quotes (a random walk over five symbols, decimal strings as
Binance sends them), each method into an emptied table, row count checked after each:

1. the original plan's path: asyncpg ``executemany`` of 50-row batches, ``Decimal`` parameters
   (the baseline, 1.00x);
2. SQLAlchemy ORM ``add_all`` + commit per 50 rows (what a user would write by hand);
3. ``repo.add()`` per quote, then ``flush()``: end to end, validation included;
4. ``repo.insert_many()`` on the same quotes;
5. ``psql \\copy`` of a CSV of the same rows (the ceiling; writing the CSV is not timed).

Then, in a separate process so its memory is its own: 1,000,000 quotes streamed through
``repo.add()``, reporting ``add()`` call latency (p50/p99) and the peak RSS added. And the
per-quote costs of the two CPU steps of the write path, ``to_row`` and ``encode_copy_text``.

The server is found as the tests find it: ``TEST_DATABASE_URL``, else 127.0.0.1:5432, else a
private embedded PostgreSQL. The benchmark creates its own database and drops it at the end.

    python -m benchmarks.ingest [--quotes 200000] [--stream-quotes 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path

import asyncpg
from sqlalchemy.ext.asyncio import async_sessionmaker

from benchmarks._common import bench_database, find_server, psql_binary
from orderbook_store.engine import create_engine
from orderbook_store.models import QUOTE_COLUMNS, OrderbookData
from orderbook_store.pg.copy_in import COPY_COLUMNS, encode_copy_text
from orderbook_store.quote import to_row
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk

ROOT = Path(__file__).resolve().parent.parent
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT")
BASELINE_BATCH = 50  # the original plan's batch size
#: A benchmark that cannot write reports it instead of waiting for the server forever.
FLUSH_TIMEOUT_S = 300.0
Quotes = list[dict[str, object]]


# -- server and database -------------------------------------------------------------------


async def empty_tables(settings: Settings) -> None:
    conn = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        tables = await conn.fetch(
            "SELECT quote_ident(tablename) AS name FROM pg_tables "
            "WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
        )
        await conn.execute("TRUNCATE " + ", ".join(row["name"] for row in tables))
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def row_count(settings: Settings) -> int:
    conn = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        return int(await conn.fetchval("SELECT count(*) FROM orderbook_data"))
    finally:
        await conn.close()


async def server_version(settings: Settings) -> str:
    conn = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


# -- the methods ---------------------------------------------------------------------------

INSERT_SQL = (
    "INSERT INTO orderbook_data (exchange, symbol, timestamp, local_timestamp, "
    "ask_amount, ask_price, bid_price, bid_amount) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
)


def _decimal(value: object) -> Decimal | None:
    return None if value is None else Decimal(str(value))


async def original_executemany(settings: Settings, quotes: Quotes, _: Path) -> None:
    """The original plan: Decimal parameters, ``executemany`` per 50 rows."""
    conn = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        batch: list[tuple[object, ...]] = []
        for q in quotes:
            batch.append(
                (
                    q["exchange"],
                    q["symbol"],
                    q["timestamp"],
                    q["local_timestamp"],
                    _decimal(q["ask_amount"]),
                    _decimal(q["ask_price"]),
                    _decimal(q["bid_price"]),
                    _decimal(q["bid_amount"]),
                )
            )
            if len(batch) == BASELINE_BATCH:
                await conn.executemany(INSERT_SQL, batch)
                batch = []
        if batch:
            await conn.executemany(INSERT_SQL, batch)
    finally:
        await conn.close()


async def orm_add_all(settings: Settings, quotes: Quotes, _: Path) -> None:
    """SQLAlchemy ORM by hand: model objects, ``add_all`` and a commit per 50 rows."""
    engine = create_engine(settings)
    session_factory = async_sessionmaker(engine, expire_on_commit=False)
    try:
        async with session_factory() as session:
            for start in range(0, len(quotes), BASELINE_BATCH):
                session.add_all(
                    [
                        OrderbookData(
                            exchange=q["exchange"],
                            symbol=q["symbol"],
                            timestamp=q["timestamp"],
                            local_timestamp=q["local_timestamp"],
                            ask_amount=_decimal(q["ask_amount"]),
                            ask_price=_decimal(q["ask_price"]),
                            bid_price=_decimal(q["bid_price"]),
                            bid_amount=_decimal(q["bid_amount"]),
                        )
                        for q in quotes[start : start + BASELINE_BATCH]
                    ]
                )
                await session.commit()
    finally:
        await engine.dispose()


async def repo_add(settings: Settings, quotes: Quotes, spool_dir: Path) -> None:
    """The collector's path: ``add()`` per quote (validated), then ``flush()``."""
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine, spool_dir=spool_dir) as repo:
            add = repo.add
            for q in quotes:
                await add(q)
            await repo.flush(timeout_s=FLUSH_TIMEOUT_S)
    finally:
        await engine.dispose()


async def repo_insert_many(settings: Settings, quotes: Quotes, spool_dir: Path) -> None:
    """Bulk: ``insert_many`` of every quote (validated, one streamed COPY)."""
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine, spool_dir=spool_dir) as repo:
            written = await repo.insert_many(quotes)
            assert written == len(quotes), written
    finally:
        await engine.dispose()


def write_csv(quotes: Quotes, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(QUOTE_COLUMNS)
        for q in quotes:
            writer.writerow(["" if q[c] is None else q[c] for c in QUOTE_COLUMNS])


def run_psql_copy(settings: Settings, csv_path: Path) -> None:
    """``psql \\copy`` of the CSV: client-side COPY, the ceiling of any client."""
    env = dict(os.environ, PGSSLMODE=settings.sslmode)
    if settings.password is not None:
        env["PGPASSWORD"] = settings.password.get_secret_value()
    columns = ", ".join(COPY_COLUMNS)
    command = f"\\copy orderbook_data ({columns}) FROM '{csv_path}' WITH (FORMAT csv, HEADER true)"
    subprocess.run(
        [psql_binary(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", settings.host,
         "-p", str(settings.port), "-U", settings.user, "-d", settings.name, "-c", command],
        env=env,
        check=True,
        timeout=600,
    )  # fmt: skip


# -- the streaming child: add() latency and memory -----------------------------------------


def current_rss_bytes() -> int:
    """Resident set size now (Linux ``/proc/self/statm``); ``ru_maxrss`` is a lifetime peak."""
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def stream_child(url: str, count: int, spool_dir: str) -> None:
    """Stream ``count`` quotes through ``add()``; print JSON with latency and RSS added.

    RSS is sampled every 1,000 quotes (and after the final flush); the peak of the samples
    minus the RSS before the stream is what streaming added.
    """
    settings = Settings(database_url=url)
    pool = QuoteWalk(SYMBOLS, seed=3).take(10_000)
    latencies_ns = array("q", [0]) * count  # allocated before the RSS baseline

    async def run() -> dict[str, float]:
        engine = create_engine(settings)
        try:
            async with OrderbookRepository(engine, spool_dir=spool_dir) as repo:
                for q in pool[:100]:  # connect, start the writer, warm caches
                    await repo.add(q)
                await repo.flush(timeout_s=FLUSH_TIMEOUT_S)
                gc.collect()
                base_rss = peak_rss = current_rss_bytes()
                clock = time.perf_counter_ns
                add = repo.add
                started = time.perf_counter()
                for i in range(count):
                    q = pool[i % 10_000]
                    before = clock()
                    await add(q)
                    latencies_ns[i] = clock() - before
                    if i % 1000 == 0:
                        peak_rss = max(peak_rss, current_rss_bytes())
                await repo.flush(timeout_s=FLUSH_TIMEOUT_S)
                elapsed = time.perf_counter() - started
                peak_rss = max(peak_rss, current_rss_bytes())
        finally:
            await engine.dispose()
        ordered = sorted(latencies_ns)
        return {
            "rows_per_s": count / elapsed,
            "p50_us": ordered[len(ordered) // 2] / 1000,
            "p99_us": ordered[int(len(ordered) * 0.99)] / 1000,
            "max_us": ordered[-1] / 1000,
            "rss_added_mb": (peak_rss - base_rss) / 2**20,
        }

    print(json.dumps(asyncio.run(run())))


# -- CPU costs of the write path -----------------------------------------------------------


def cpu_costs(quotes: Quotes) -> tuple[float, float]:
    """(µs per to_row, µs per row of encode_copy_text in 1,000-row batches), best of 3."""
    sample = quotes[:100_000]
    best_validate = best_encode = float("inf")
    rows = [to_row(q) for q in sample]
    batches = [rows[i : i + 1000] for i in range(0, len(rows), 1000)]
    for _ in range(3):
        started = time.perf_counter()
        for q in sample:
            to_row(q)
        best_validate = min(best_validate, time.perf_counter() - started)
        started = time.perf_counter()
        for batch in batches:
            encode_copy_text(batch)
        best_encode = min(best_encode, time.perf_counter() - started)
    return best_validate / len(sample) * 1e6, best_encode / len(rows) * 1e6


# -- driver --------------------------------------------------------------------------------

Method = Callable[[Settings, Quotes, Path], object]


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ingest benchmark and print one line per method (rows/s, ratio to baseline)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__)
    parser.add_argument("--quotes", type=int, default=200_000, help="quotes per method")
    parser.add_argument("--stream-quotes", type=int, default=1_000_000, help="0 to skip")
    parser.add_argument("--stream-child", nargs=3, metavar=("URL", "COUNT", "SPOOL"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    # A terminated run still drops its database (the ``finally`` blocks need an exception).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.stream_child:
        url, count, spool = args.stream_child
        stream_child(url, int(count), spool)
        return

    quotes: Quotes = QuoteWalk(SYMBOLS, seed=11).take(args.quotes)
    validate_us, encode_us = cpu_costs(quotes)
    with find_server() as (server_url, where), bench_database(server_url) as url, \
            tempfile.TemporaryDirectory(prefix="obs-bench-") as tmp:  # fmt: skip
        settings = Settings(database_url=url, pool_size=4)
        version = asyncio.run(server_version(settings))
        csv_path = Path(tmp) / "quotes.csv"
        write_csv(quotes, csv_path)
        print(
            f"ingest: {len(quotes):,} quotes, {len(SYMBOLS)} symbols; PostgreSQL {version} "
            f"({where}); Python {platform.python_version()}, {os.cpu_count()} CPUs"
        )
        methods: list[tuple[str, Method]] = [
            ("original plan: asyncpg executemany x50, Decimal", original_executemany),
            ("SQLAlchemy ORM add_all + commit per 50", orm_add_all),
            ("repo.add() per quote, then flush()", repo_add),
            ("repo.insert_many()", repo_insert_many),
            ("psql \\copy of a CSV (ceiling)", lambda s, q, _: run_psql_copy(s, csv_path)),
        ]
        baseline: float | None = None
        results: dict[str, float] = {}
        for index, (label, method) in enumerate(methods):
            asyncio.run(empty_tables(settings))
            spool_dir = Path(tmp) / f"spool-{index}"
            started = time.perf_counter()
            outcome = method(settings, quotes, spool_dir)
            if asyncio.iscoroutine(outcome):
                asyncio.run(outcome)
            elapsed = time.perf_counter() - started
            stored = asyncio.run(row_count(settings))
            if stored != len(quotes):
                raise SystemExit(f"{label}: {stored:,} rows stored, expected {len(quotes):,}")
            rate = len(quotes) / elapsed
            baseline = baseline or rate
            results[label] = rate
            print(f"  {label:<50} {rate:>10,.0f} rows/s  {rate / baseline:5.2f}x", flush=True)
        ceiling = results["psql \\copy of a CSV (ceiling)"]
        print(
            f"  insert_many / psql \\copy: {results['repo.insert_many()'] / ceiling:.2f}x;  "
            f"to_row {validate_us:.2f} µs/quote, encode_copy_text {encode_us:.2f} µs/row"
        )
        if args.stream_quotes:
            asyncio.run(empty_tables(settings))
            child = subprocess.run(
                [sys.executable, "-m", "benchmarks.ingest", "--stream-child", url,
                 str(args.stream_quotes), str(Path(tmp) / "spool-stream")],
                cwd=ROOT, check=True, capture_output=True, text=True, timeout=1800,
            )  # fmt: skip
            stream = json.loads(child.stdout.strip().splitlines()[-1])
            stored = asyncio.run(row_count(settings))
            print(
                f"  stream of {args.stream_quotes:,} quotes through add(): "
                f"{stream['rows_per_s']:,.0f} rows/s; add() p50 {stream['p50_us']:.2f} µs, "
                f"p99 {stream['p99_us']:.2f} µs, max {stream['max_us']:,.0f} µs; "
                f"peak RSS added {stream['rss_added_mb']:.1f} MB; "
                f"{stored - 100:,} rows stored"
            )


if __name__ == "__main__":
    main()
