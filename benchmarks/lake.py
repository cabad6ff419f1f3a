"""Lake benchmark: archiving closed partitions vs exporting the same rows, in one run.

The same quotes (``--days`` days x 4 symbols, made by the server with ``generate_series``) sit in
daily partitions. Then, best of ``--repeat``:

1. ``export``: each symbol's whole range exported to a directory (``files.export``);
2. ``archive``: every one of those days archived to a directory lake (``ops.archive``): the
   same rows written, plus the checksum aggregate on the server, every file read back and
   verified, and the catalog entry (its catalog is emptied between repeats).

The ratio is archive rows/s over export rows/s (target: at least 0.8x). The server is found as
the tests find it; the database and directories are made here and removed at the end.

    python -m benchmarks.lake [--rows 2000000] [--days 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks._common import admin_execute, bench_database, find_server
from benchmarks.partitions import FILL_SQL, SYMBOLS
from orderbook_store.engine import create_engine
from orderbook_store.files.export import export_parquet
from orderbook_store.ops import archive, partitions
from orderbook_store.settings import Settings

DAY_US = 86_400_000_000
START = dt.date(2024, 1, 1)
T0 = partitions.to_us(START)


async def fill(url: str, rows: int, days: int) -> None:
    engine = create_engine(Settings(database_url=url, pool_size=2))
    try:
        await partitions.ensure(engine, ahead=days, today=START)
    finally:
        await engine.dispose()
    await admin_execute(url, FILL_SQL.format(t0=T0, span=days * DAY_US, rows=rows))
    await admin_execute(url, "VACUUM ANALYZE orderbook_data")


async def export_all(url: str, out: Path, days: int) -> tuple[float, int]:
    engine = create_engine(Settings(database_url=url, pool_size=2))
    try:
        started = time.perf_counter()
        rows = 0
        for symbol in SYMBOLS:
            summary = await export_parquet(
                engine, symbol=symbol, start_us=T0, end_us=T0 + days * DAY_US, out=out
            )
            rows += summary.rows
        return time.perf_counter() - started, rows
    finally:
        await engine.dispose()


async def archive_all(url: str, out: Path, days: int) -> tuple[float, int]:
    engine = create_engine(Settings(database_url=url, pool_size=2))
    try:
        await admin_execute(url, "DELETE FROM orderbook_lake_ranges")
        lake = archive.directory_lake(out)
        started = time.perf_counter()
        result = await archive.archive(engine, lake, START + dt.timedelta(days=days))
        elapsed = time.perf_counter() - started
        assert len(result.archived) == days, result
        return elapsed, result.rows
    finally:
        await engine.dispose()


def _line(label: str, seconds: float, rows: int, extra: str = "") -> None:
    print(f"  {label:<48} {seconds * 1000:9.1f} ms  {rows / seconds:>12,.0f} rows/s  {extra}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print times, rates and the ratio."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="obs_lake_bench"))
    try:
        with find_server() as (server_url, where), bench_database(server_url) as url:
            asyncio.run(fill(url, args.rows, args.days))
            print(
                f"lake benchmark on {where}: {args.rows:,} rows, {args.days} days x "
                f"{len(SYMBOLS)} symbols in daily partitions, to a local directory"
            )
            best: dict[str, tuple[float, int]] = {}
            for _ in range(args.repeat):
                for name, run in (("export", export_all), ("archive", archive_all)):
                    out = scratch / name
                    shutil.rmtree(out, ignore_errors=True)
                    seconds, rows = asyncio.run(run(url, out, args.days))
                    if name not in best or seconds < best[name][0]:
                        best[name] = (seconds, rows)
            export_s, export_rows = best["export"]
            archive_s, archive_rows = best["archive"]
            assert export_rows == archive_rows == args.rows, (export_rows, archive_rows)
            _line("export (each symbol's range)", export_s, export_rows)
            _line(
                "archive (write, read back, verify, record)",
                archive_s,
                archive_rows,
                f"{export_s / archive_s:.2f}x export's rate (target >= 0.8x)",
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
