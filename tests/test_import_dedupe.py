"""Never twice: imports skip quotes already stored, exactly, as multisets; verify tells overlap."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import gzip
import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.files.export import export_parquet
from orderbook_store.files.importers import import_paths
from orderbook_store.files.importers.dedupe import LeafPartition, partitions_for
from orderbook_store.files.importers.verify import verify_paths
from orderbook_store.models import QUOTE_COLUMNS
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk

Row = tuple[object, ...]
US_PER_DAY = 86_400_000_000


def _value(name: str, value: object) -> object:
    if name in ("timestamp", "local_timestamp"):
        return int(str(value))
    if name in ("exchange", "symbol"):
        return str(value)
    return None if value in (None, "") else Decimal(str(value))


def as_rows(quotes: Iterable[Mapping[str, object]]) -> list[Row]:
    """Quotes as table-typed tuples (Decimal compares and hashes by value: 1.0 == 1.00)."""
    return [tuple(_value(name, quote[name]) for name in QUOTE_COLUMNS) for quote in quotes]


def file_rows(path: Path) -> list[Row]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as handle:  # type: ignore[operator]
        return as_rows(csv.DictReader(handle))


async def table_rows(engine: AsyncEngine) -> list[Row]:
    async with engine.connect() as conn:
        result = await conn.execute(
            text(f"SELECT {', '.join(QUOTE_COLUMNS)} FROM orderbook_data ORDER BY id")
        )
        return [tuple(row) for row in result]


def write_quotes(path: Path, quotes: Sequence[Mapping[str, object]]) -> Path:
    """A tardis ``quotes`` CSV (gzipped when the name ends in .gz)."""
    out = io.StringIO()
    out.write(",".join(QUOTE_COLUMNS) + "\n")
    for quote in quotes:
        out.write(",".join("" if quote[c] is None else str(quote[c]) for c in QUOTE_COLUMNS))
        out.write("\n")
    data = out.getvalue().encode()
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.suffix == ".gz" else data)
    return path


def walk(rows: int, *, seed: int = 3, start_us: int | None = None) -> list[dict[str, object]]:
    kwargs = {} if start_us is None else {"start_us": start_us}
    return QuoteWalk(["ETHUSDT"], seed=seed, **kwargs).take(rows)


async def store_with_writer(engine: AsyncEngine, quotes: Sequence[Mapping[str, object]]) -> None:
    """What the collector does: ``add`` each quote, then ``flush``."""
    async with OrderbookRepository(engine) as repo:
        await repo.add_many(quotes)
        await repo.flush()


def _env(settings: Settings) -> dict[str, str]:
    assert settings.database_url is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    env["DATABASE_URL"] = settings.database_url.get_secret_value()
    return env


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orderbook_store", *args],
        env={**_env(settings), "COLUMNS": "250"},  # wide: the summary's numbers stay whole
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


async def test_an_export_imported_into_the_same_database_stores_nothing_and_says_so(
    engine: AsyncEngine, settings: Settings, real_quotes_path: Path, tmp_path: Path
) -> None:
    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    before = await table_rows(engine)
    await export_parquet(engine, symbol="BTCUSDT", start_us=0, end_us=2**62, out=tmp_path / "lake")

    again = await import_paths(engine, [tmp_path / "lake"], quarantine=tmp_path / "q.csv")

    assert [(f.status, f.rows, f.duplicates) for f in again.files] == [("imported", 0, 9999)]
    assert (again.rows, again.duplicates) == (0, 9999)
    assert len(before) == 9999
    assert Counter(await table_rows(engine)) == Counter(before)

    # Through the CLI, a copy with other bytes (so not recognised by the ledger) adds nothing.
    copy = tmp_path / "copy.csv"
    with gzip.open(real_quotes_path, "rb") as source:
        copy.write_bytes(source.read().replace(b"\n", b"\r\n"))
    done = await asyncio.to_thread(_cli, settings, "import", str(copy))
    assert done.returncode == 0, done.stderr
    assert "0 rows stored, 9,999 skipped as already stored" in done.stdout
    assert Counter(await table_rows(engine)) == Counter(before)


async def test_overlapping_sources_store_the_rest_exactly_once(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    quotes = walk(150_000)  # several blocks: some overlap what is stored, some do not
    # The writer stored the middle third, and every seventh quote of the rest.
    by_writer = [q for i, q in enumerate(quotes) if 50_000 <= i < 100_000 or i % 7 == 0]
    await store_with_writer(engine, by_writer)
    path = write_quotes(tmp_path / "old-source.csv.gz", quotes)

    summary = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")

    assert (summary.rows, summary.duplicates) == (150_000 - len(by_writer), len(by_writer))
    assert Counter(await table_rows(engine)) == Counter(as_rows(quotes))
    async with engine.connect() as conn:
        ledger = await conn.scalar(text("SELECT rows FROM orderbook_import_files"))
    assert ledger == 150_000 - len(by_writer)  # what the file added


async def test_allow_duplicates_stores_every_row_again_and_verify_calls_it_overlap(
    engine: AsyncEngine, settings: Settings, real_quotes_path: Path, tmp_path: Path
) -> None:
    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    once = await table_rows(engine)
    await export_parquet(engine, symbol="BTCUSDT", start_us=0, end_us=2**62, out=tmp_path / "lake")

    done = await asyncio.to_thread(
        _cli, settings, "import", "--allow-duplicates", str(tmp_path / "lake")
    )

    assert done.returncode == 0, done.stderr
    assert "9,999 rows stored, 0 skipped as already stored" in done.stdout
    assert Counter(await table_rows(engine)) == Counter(once * 2)
    verdict = await verify_paths(engine, [real_quotes_path])
    (group,) = verdict.files[0].groups
    assert (verdict.files[0].status, group.status) == ("overlap", "overlap")
    assert (group.missing, group.extra, group.extra_copies) == (0, 9999, 9999)
    assert verdict.exit_code == 3


async def test_verify_reports_overlap_apart_from_mismatch(
    engine: AsyncEngine, settings: Settings, tmp_path: Path
) -> None:
    quotes = walk(3000)
    path = write_quotes(tmp_path / "file.csv", quotes[::2])
    await import_paths(engine, [path], quarantine=tmp_path / "q.csv")
    exact = await verify_paths(engine, [path])
    assert (exact.files[0].status, exact.exit_code) == ("ok", 0)

    # The collector's quotes of the same hours: the file is all there, and more.
    await store_with_writer(engine, quotes[1::2])
    overlap = await verify_paths(engine, [path])
    (group,) = overlap.files[0].groups
    assert (overlap.files[0].status, overlap.exit_code) == ("overlap", 3)
    # (The writer's last quote comes after the file's last: outside the range compared.)
    assert (group.file.rows, group.database.rows) == (1500, 2999)
    assert (group.matched, group.missing, group.extra, group.extra_copies) == (1500, 0, 1499, 0)
    shown = await asyncio.to_thread(_cli, settings, "verify", str(path))
    assert shown.returncode == 3
    assert "OVERLAP" in shown.stdout and "MISMATCH" not in shown.stdout

    # One of the file's rows changed: a mismatch, however much else overlaps.
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE orderbook_data SET bid_amount = bid_amount + 1 "
                "WHERE timestamp = :ts AND local_timestamp = :lts"
            ),
            {"ts": quotes[100]["timestamp"], "lts": quotes[100]["local_timestamp"]},
        )
    changed = await verify_paths(engine, [path])
    (group,) = changed.files[0].groups
    assert (changed.files[0].status, changed.exit_code) == ("mismatch", 1)
    assert (group.missing, group.extra) == (1, 1500)
    shown = await asyncio.to_thread(_cli, settings, "verify", str(path))
    assert shown.returncode == 1
    assert "MISMATCH" in shown.stdout


async def test_repeated_quotes_count_as_multisets(engine: AsyncEngine, tmp_path: Path) -> None:
    q, r, s, t = walk(4, seed=8)
    # The table holds q once and r three times; the file has q three times, r twice, s once.
    await store_with_writer(engine, [q, r, r, r])
    path = write_quotes(tmp_path / "repeats.csv", [q, r, q, s, r, q])

    summary = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")

    # Each quote ends up max(file, table) times: q 3 (2 added), r 3 (none), s 1 (1 added).
    assert (summary.rows, summary.duplicates) == (3, 3)
    assert Counter(await table_rows(engine)) == Counter(as_rows([q, q, q, r, r, r, s]))

    # A new file's own repeats are kept as they are.
    fresh = write_quotes(tmp_path / "fresh.csv", [t, t])
    again = await import_paths(engine, [fresh], quarantine=tmp_path / "q.csv")
    assert (again.rows, again.duplicates) == (2, 0)
    assert Counter(await table_rows(engine))[as_rows([t])[0]] == 2


async def test_repeats_in_different_blocks_of_one_file_are_counted_together(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    quotes = walk(120_000, seed=12)  # three blocks or more
    repeated = quotes[10]
    # The repeat sits in the last block; the table holds one copy, and rows all along.
    source = [*quotes, repeated]
    await store_with_writer(engine, [repeated, *quotes[::1000], quotes[-5]])

    await import_paths(
        engine, [write_quotes(tmp_path / "f.csv", source)], quarantine=tmp_path / "q"
    )

    assert Counter(await table_rows(engine)) == Counter(as_rows(source))


async def test_values_are_compared_as_the_table_stores_them(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    base = {
        "exchange": "binance-futures",
        "symbol": "XRPUSDT",
        "timestamp": 1704067200000000,
        "local_timestamp": 1704067200001000,
    }
    stored = [
        {**base, "ask_amount": "1.0", "ask_price": "0.50", "bid_price": "0.001",
         "bid_amount": None},
        {**base, "timestamp": 1704067200000001, "ask_amount": "12", "ask_price": "0.6",
         "bid_price": "0.59", "bid_amount": "3"},
    ]  # fmt: skip
    await store_with_writer(engine, stored)
    same = [
        {**base, "ask_amount": "1.00000000", "ask_price": "0.5", "bid_price": "1e-3",
         "bid_amount": None},
        {**base, "timestamp": 1704067200000001, "ask_amount": "12.000", "ask_price": "00.60",
         "bid_price": "0.590", "bid_amount": "3.0"},
    ]  # fmt: skip
    different = {
        **base,
        "ask_amount": "1.0",
        "ask_price": "0.50",
        "bid_price": "0.001",
        "bid_amount": "0",
    }  # fmt: skip  (0 is not NULL)
    path = write_quotes(tmp_path / "spelled.csv", [*same, different])

    summary = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")

    assert (summary.rows, summary.duplicates, summary.quarantined) == (1, 2, 0)
    assert Counter(await table_rows(engine)) == Counter(as_rows([*stored, different]))


async def test_a_stored_row_without_created_at_is_still_recognised(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    quotes = walk(3, seed=9)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                f"INSERT INTO orderbook_data ({', '.join(QUOTE_COLUMNS)}, created_at) "
                "VALUES (:exchange, :symbol, :timestamp, :local_timestamp, "
                "CAST(:ask_amount AS numeric), CAST(:ask_price AS numeric), "
                "CAST(:bid_price AS numeric), CAST(:bid_amount AS numeric), NULL)"
            ),
            quotes[1],
        )
    path = write_quotes(tmp_path / "three.csv", quotes)

    summary = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")

    assert (summary.rows, summary.duplicates) == (2, 1)
    assert Counter(await table_rows(engine)) == Counter(as_rows(quotes))


async def test_an_import_waits_for_a_writer_of_the_same_partition_and_skips_its_rows(
    engine: AsyncEngine, settings: Settings, tmp_path: Path
) -> None:
    quotes = walk(10_000, seed=21)
    path = write_quotes(tmp_path / "hours.csv", quotes)
    writer = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        # A writer's batch of the same hours, not yet committed when the import starts.
        batch = writer.transaction()
        await batch.start()
        await writer.copy_records_to_table(
            "orderbook_data",
            records=[
                (q["exchange"], q["symbol"], q["timestamp"], q["local_timestamp"],
                 *(Decimal(str(q[c])) for c in QUOTE_COLUMNS[4:]))
                for q in quotes[2000:6000]
            ],
            columns=list(QUOTE_COLUMNS),
        )  # fmt: skip
        importing = asyncio.create_task(import_paths(engine, [path], quarantine=tmp_path / "q.csv"))
        await asyncio.sleep(1.5)
        assert not importing.done(), "the import did not wait for the writer's open batch"
        await batch.commit()
        summary = await asyncio.wait_for(importing, 60)
    finally:
        await writer.close()

    assert (summary.rows, summary.duplicates) == (6000, 4000)
    assert Counter(await table_rows(engine)) == Counter(as_rows(quotes))


async def test_two_imports_of_overlapping_files_at_once_store_each_quote_once(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    quotes = walk(60_000, seed=31)
    first = write_quotes(tmp_path / "a.csv", quotes[:40_000])
    second = write_quotes(tmp_path / "b.csv", quotes[20_000:])

    results = await asyncio.gather(
        import_paths(engine, [first], quarantine=tmp_path / "a.q"),
        import_paths(engine, [second], quarantine=tmp_path / "b.q"),
    )

    assert sum(r.rows for r in results) == 60_000
    assert sum(r.duplicates for r in results) == 20_000
    assert Counter(await table_rows(engine)) == Counter(as_rows(quotes))


async def test_imports_locking_partitions_in_opposite_orders_still_store_each_quote_once(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    # Two days that have partitions of their own (today's partitions and the week ahead).
    tomorrow = (dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=1)).toordinal()
    day1 = (tomorrow - dt.date(1970, 1, 1).toordinal()) * US_PER_DAY
    early, late = (
        walk(60_000, seed=41, start_us=day1),
        walk(60_000, seed=42, start_us=day1 + US_PER_DAY),
    )
    assert early[-1]["timestamp"] < day1 + US_PER_DAY  # type: ignore[operator]
    forward = write_quotes(tmp_path / "forward.csv", [*early, *late[:30_000]])
    backward = write_quotes(tmp_path / "backward.csv", [*late, *early[:30_000]])

    results = await asyncio.gather(
        import_paths(engine, [forward], quarantine=tmp_path / "a.q"),
        import_paths(engine, [backward], quarantine=tmp_path / "b.q"),
    )

    assert sum(r.rows for r in results) == 120_000
    assert Counter(await table_rows(engine)) == Counter(as_rows([*early, *late]))


async def _copy_in_progress(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        value = await conn.scalar(
            text(
                "SELECT coalesce(max(tuples_processed), 0) FROM pg_stat_progress_copy "
                "WHERE datname = current_database()"
            )
        )
    return int(value or 0)


@pytest.mark.slow
async def test_a_killed_import_rerun_stores_everything_exactly_once(
    engine: AsyncEngine, settings: Settings, tmp_path: Path
) -> None:
    quotes = walk(400_000, seed=51)
    await store_with_writer(engine, quotes[150_000:200_000])  # the collector had some hours
    path = write_quotes(tmp_path / "big.csv.gz", quotes)
    process = subprocess.Popen(
        [sys.executable, "-m", "orderbook_store", "import", "--quiet", str(path)],
        env=_env(settings),
    )
    try:
        # Killed in the fourth block (~48,000 rows each, one COPY each), the one reaching the
        # collector's hours: three blocks sent, one held back.
        deadline = time.monotonic() + 120
        blocks, last = 1, 0
        while blocks < 4 or last < 10_000:
            assert process.poll() is None, "the import finished before it could be interrupted"
            assert time.monotonic() < deadline
            now = await _copy_in_progress(engine)
            blocks, last = blocks + (now < last), now
            await asyncio.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    deadline = time.monotonic() + 30
    while await _copy_in_progress(engine):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert Counter(await table_rows(engine)) == Counter(as_rows(quotes[150_000:200_000]))

    rerun = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")

    assert (rerun.rows, rerun.duplicates) == (350_000, 50_000)
    assert Counter(await table_rows(engine)) == Counter(as_rows(quotes))
    again = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")
    assert [f.status for f in again.files] == ["skipped"]
    assert len(await table_rows(engine)) == 400_000


def test_only_the_partitions_of_a_block_are_locked() -> None:
    day = US_PER_DAY
    parts = [
        LeafPartition("p1", 10 * day, 11 * day),
        LeafPartition("p2", 11 * day, 12 * day),
        LeafPartition("p_default", None, None, default=True),
    ]

    assert partitions_for(parts, 10 * day + 5, 11 * day - 1) == ["p1"]
    assert partitions_for(parts, 11 * day - 1, 11 * day) == ["p1", "p2"]
    assert partitions_for(parts, 3 * day, 3 * day + 9) == ["p_default"]
    assert partitions_for(parts, 11 * day, 12 * day) == ["p2", "p_default"]
    # A table without partitions (before revision 0004) is locked whole.
    assert partitions_for([LeafPartition("orderbook_data", None, None)], 0, 1) == ["orderbook_data"]


@pytest.mark.slow
async def test_the_writer_of_today_does_not_wait_for_an_import_of_other_days(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    path = write_quotes(tmp_path / "old.csv.gz", walk(600_000, seed=61))  # January 2024
    importing = asyncio.create_task(import_paths(engine, [path], quarantine=tmp_path / "q.csv"))
    deadline = time.monotonic() + 120
    while await _copy_in_progress(engine) < 20_000:
        assert not importing.done(), "the import finished before the writer wrote"
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    now_us = int(time.time() * 1_000_000)
    today = walk(10, seed=62, start_us=now_us)

    started = time.monotonic()
    async with OrderbookRepository(engine) as repo:
        await repo.add_many(today)
        await repo.flush(timeout_s=30)
    waited = time.monotonic() - started
    still_importing = not importing.done()

    summary = await asyncio.wait_for(importing, 120)
    assert still_importing, "the import ended first: nothing was shown"
    assert waited < 2, f"the writer waited {waited:.1f} s"
    assert summary.rows == 600_000
    assert len(await table_rows(engine)) == 600_010
