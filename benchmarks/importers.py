"""Import and export benchmark: a 1,000,000-row tardis quotes ``.csv.gz`` vs ``psql \\copy``.

One run, same rows, same fresh database (emptied and checkpointed between methods):

1. ``psql \\copy`` of the same rows decompressed (plain CSV): the ceiling of any client
   (after an untimed 100,000-row warm-up load, so neither method meets a cold server);
2. ``import_paths`` of the ``.csv.gz`` (what ``orderbook-store import`` runs): gzip, format
   detection, content hash, per-row validation, COPY and the ledger entry, in one transaction;
   target >= 0.8x of (1);
3. ``export_parquet`` of all those rows (zstd, hive-partitioned): rows/s;
4. ``import_paths`` of that Parquet tree into the emptied table, and ``verify_paths`` of the
   original file against it: rows/s;
5. ``import_paths`` of the ``.csv.gz`` again (ledger emptied) while the table holds every row,
   then half of them (every other id): the cost of skipping quotes already stored.

The server is found as the tests find it (``TEST_DATABASE_URL``, else 127.0.0.1:5432, else a
private embedded PostgreSQL); the benchmark creates its own database and drops it at the end.

    python -m benchmarks.importers [--rows 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
from sqlalchemy import text

from benchmarks._common import bench_database, find_server, psql_binary
from orderbook_store.engine import create_engine
from orderbook_store.files.export import export_parquet
from orderbook_store.files.importers import import_paths
from orderbook_store.files.importers.verify import verify_paths
from orderbook_store.models import QUOTE_COLUMNS
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk

SYMBOL = "BTCUSDT"


async def _sql(settings: Settings, sql: str) -> object:
    conn = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def empty(settings: Settings) -> None:
    asyncio.run(_sql(settings, "TRUNCATE orderbook_data, orderbook_import_files"))
    asyncio.run(_sql(settings, "CHECKPOINT"))


def count(settings: Settings) -> int:
    return int(asyncio.run(_sql(settings, "SELECT count(*) FROM orderbook_data")))  # type: ignore[call-overload]


def psql_copy(settings: Settings, csv_path: Path) -> None:
    env = dict(os.environ, PGSSLMODE=settings.sslmode)
    if settings.password is not None:
        env["PGPASSWORD"] = settings.password.get_secret_value()
    command = (
        f"\\copy orderbook_data ({', '.join(QUOTE_COLUMNS)}) FROM '{csv_path}' "
        "WITH (FORMAT csv, HEADER true)"
    )
    subprocess.run(
        [psql_binary(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", settings.host,
         "-p", str(settings.port), "-U", settings.user, "-d", settings.name, "-c", command],
        env=env,
        check=True,
        timeout=1200,
    )  # fmt: skip


def write_files(rows: int, directory: Path) -> tuple[Path, Path]:
    """The same rows as ``quotes.csv.gz`` (tardis layout) and decompressed ``quotes.csv``."""
    walk = QuoteWalk([SYMBOL], seed=17)
    plain = directory / "quotes.csv"
    with plain.open("w", encoding="utf-8") as out:
        out.write(",".join(QUOTE_COLUMNS) + "\n")
        left = rows
        while left:
            batch = walk.take(min(left, 100_000))
            left -= len(batch)
            out.write("".join(",".join(str(q[c]) for c in QUOTE_COLUMNS) + "\n" for q in batch))
    packed = directory / f"binance-futures_quotes_{SYMBOL}.csv.gz"
    with plain.open("rb") as source, gzip.open(packed, "wb", compresslevel=6) as target:
        shutil.copyfileobj(source, target, 1 << 20)
    return packed, plain


def timed(label: str, rows: int, seconds: float, extra: str = "") -> str:
    return f"  {label:<52} {seconds:7.2f} s  {rows / seconds:>10,.0f} rows/s{extra}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.importers")
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args(argv if argv is not None else [])
    rows: int = args.rows
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    with (
        tempfile.TemporaryDirectory(prefix="obs-bench-import-") as tmp,
        find_server() as (url, where),
    ):
        directory = Path(tmp)
        packed, plain = write_files(rows, directory)
        warmup = directory / "warmup.csv"
        with plain.open("rb") as source, warmup.open("wb") as target:
            target.writelines(line for _, line in zip(range(100_001), source, strict=False))
        with bench_database(url) as bench_url:
            settings = Settings(database_url=bench_url)
            version = asyncio.run(_sql(settings, "SHOW server_version"))
            packed_mb, plain_mb = packed.stat().st_size / 1e6, plain.stat().st_size / 1e6
            print(
                f"importers: {rows:,}-row tardis quotes .csv.gz ({packed_mb:.1f} MB; "
                f"{plain_mb:.1f} MB decompressed), PostgreSQL {version} at {where}, "
                f"{os.cpu_count()} cores, one run each"
            )
            # Untimed warm-up, so neither measured load pays for a cold server and cache.
            psql_copy(settings, warmup)
            empty(settings)
            started = time.perf_counter()
            psql_copy(settings, plain)
            ceiling = time.perf_counter() - started
            assert count(settings) == rows
            print(timed("psql \\copy of the decompressed CSV (ceiling)", rows, ceiling))

            empty(settings)
            out = directory / "export"

            async def run() -> tuple[float, float, float, float, float, float]:
                engine = create_engine(settings)
                try:
                    started = time.perf_counter()
                    summary = await import_paths(engine, [packed], quarantine=directory / "q.csv")
                    imported = time.perf_counter() - started
                    assert summary.rows == rows and summary.exit_code == 0, summary
                    started = time.perf_counter()
                    exported = await export_parquet(
                        engine, symbol=SYMBOL, start_us=0, end_us=2**62, out=out
                    )
                    export_s = time.perf_counter() - started
                    assert exported.rows == rows
                    started = time.perf_counter()
                    verified = await verify_paths(engine, [packed])
                    verify_s = time.perf_counter() - started
                    assert verified.exit_code == 0
                    async with engine.begin() as conn:
                        await conn.exec_driver_sql(
                            "TRUNCATE orderbook_data, orderbook_import_files"
                        )
                        await conn.exec_driver_sql("CHECKPOINT")
                    started = time.perf_counter()
                    back = await import_paths(engine, [out], quarantine=directory / "q.csv")
                    reimport_s = time.perf_counter() - started
                    assert back.rows == rows
                    overlaps = []
                    for delete in ("false", "id % 2 = 0"):  # every row stored, then half
                        async with engine.connect() as conn:
                            await conn.execution_options(isolation_level="AUTOCOMMIT")
                            await conn.exec_driver_sql(f"DELETE FROM orderbook_data WHERE {delete}")
                            await conn.exec_driver_sql("TRUNCATE orderbook_import_files")
                            await conn.exec_driver_sql("VACUUM ANALYZE orderbook_data")
                            kept = await conn.scalar(text("SELECT count(*) FROM orderbook_data"))
                        started = time.perf_counter()
                        again = await import_paths(engine, [packed], quarantine=directory / "q")
                        overlaps.append(time.perf_counter() - started)
                        assert (again.rows, again.duplicates) == (rows - kept, kept), again
                    all_s, half_s = overlaps
                    return imported, export_s, verify_s, reimport_s, all_s, half_s
                finally:
                    await engine.dispose()

            imported, export_s, verify_s, reimport_s, all_s, half_s = asyncio.run(run())
            print(
                timed(
                    "orderbook-store import of the .csv.gz",
                    rows,
                    imported,
                    f"  = {ceiling / imported:.2f}x of psql \\copy (target >= 0.80x)",
                )
            )
            parquet_mb = sum(p.stat().st_size for p in out.rglob("*.parquet")) / 1e6
            print(timed(f"export to Parquet (zstd, {parquet_mb:.1f} MB)", rows, export_s))
            print(timed("verify of the .csv.gz against the table", rows, verify_s))
            print(
                timed(
                    "import of the exported Parquet tree",
                    rows,
                    reimport_s,
                    f"  = {ceiling / reimport_s:.2f}x of psql \\copy",
                )
            )
            print(timed("import of the .csv.gz again, every row already stored", rows, all_s))
            print(timed("import of the .csv.gz again, half already stored", rows, half_s))


if __name__ == "__main__":
    main(sys.argv[1:])
