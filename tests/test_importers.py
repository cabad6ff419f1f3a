"""Importers: every format into the table exactly once, bad lines aside, verified against files."""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.files.importers import FORMATS, import_paths
from orderbook_store.files.importers.verify import verify_paths
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk

from pgserver import run_command

REPO = Path(__file__).resolve().parent.parent
SNAPSHOT = REPO / "tests" / "data" / "tardis_book_snapshot_5_BTCUSDT_2020-09-01.csv.gz"
COLUMNS = (
    "exchange",
    "symbol",
    "timestamp",
    "local_timestamp",
    "ask_amount",
    "ask_price",
    "bid_price",
    "bid_amount",
)
Row = tuple[str, str, int, int, Decimal | None, Decimal | None, Decimal | None, Decimal | None]


def _dec(value: str) -> Decimal | None:
    return Decimal(value) if value != "" else None


def file_rows(text_: str) -> list[Row]:
    """The rows of a tardis quotes CSV text, typed like the table's."""
    reader = csv.DictReader(io.StringIO(text_))
    return [
        (
            r["exchange"],
            r["symbol"],
            int(r["timestamp"]),
            int(r["local_timestamp"]),
            _dec(r["ask_amount"]),
            _dec(r["ask_price"]),
            _dec(r["bid_price"]),
            _dec(r["bid_amount"]),
        )
        for r in reader
    ]


async def table_rows(engine: AsyncEngine) -> list[Row]:
    async with engine.connect() as conn:
        result = await conn.execute(
            text(f"SELECT {', '.join(COLUMNS)} FROM orderbook_data ORDER BY id")
        )
        return [tuple(row) for row in result]  # type: ignore[misc]


async def count(engine: AsyncEngine, table: str = "orderbook_data") -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text(f"SELECT count(*) FROM {table}")))


def as_ms(rows: Sequence[Row]) -> list[Row]:
    """What a millisecond format keeps of µs rows: event time truncated, local = event."""
    return [(r[0], r[1], r[2] // 1000 * 1000, r[2] // 1000 * 1000, *r[4:]) for r in rows]


def binance_csv_text(rows: Sequence[Row], *, header: bool) -> str:
    out = io.StringIO()
    if header:
        out.write(
            "update_id,best_bid_price,best_bid_qty,best_ask_price,best_ask_qty,"
            "transaction_time,event_time\n"
        )
    for i, (_, _, ts, _, ask_amount, ask_price, bid_price, bid_amount) in enumerate(rows):
        out.write(
            f"{1000 + i},{bid_price},{bid_amount},{ask_price},{ask_amount},"
            f"{ts // 1000 - 2},{ts // 1000}\n"
        )
    return out.getvalue()


def jsonl_text(rows: Sequence[Row], *, receive_time: bool) -> str:
    lines = []
    for i, (_, symbol, ts, lts, ask_amount, ask_price, bid_price, bid_amount) in enumerate(rows):
        message: dict[str, object] = {
            "e": "bookTicker",
            "u": 1000 + i,
            "E": ts // 1000,
            "T": ts // 1000 - 2,
            "s": symbol,
            "b": str(bid_price),
            "B": str(bid_amount),
            "a": str(ask_price),
            "A": str(ask_amount),
        }
        if receive_time:
            message["local_timestamp"] = lts
        lines.append(json.dumps(message))
    return "\n".join(lines) + "\n"


def write(path: Path, content: str, packing: str) -> Path:
    """``content`` at ``path`` plain, gzipped (``.gz`` added) or zipped (``.zip`` replaces)."""
    data = content.encode()
    if packing == "plain":
        path.write_bytes(data)
        return path
    if packing == "gz":
        target = path.with_name(path.name + ".gz")
        target.write_bytes(gzip.compress(data))
        return target
    target = path.with_suffix(".zip")
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(path.name, data)
    return target


async def test_real_tardis_file_imports_exactly_its_rows_and_rerun_adds_none(
    engine: AsyncEngine, real_quotes_path: Path, real_quotes_text: str, tmp_path: Path
) -> None:
    summary = await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")

    assert [(f.status, f.format, f.rows, f.quarantined) for f in summary.files] == [
        ("imported", "tardis-quotes", 9999, 0)
    ]
    expected = file_rows(real_quotes_text)
    assert len(expected) == 9999
    assert await table_rows(engine) == expected  # same rows, same order
    async with engine.connect() as conn:
        ledger = (
            await conn.execute(
                text(
                    "SELECT rows, quarantined, first_timestamp, last_timestamp, format "
                    "FROM orderbook_import_files"
                )
            )
        ).all()
    timestamps = [row[2] for row in expected]
    assert ledger == [(9999, 0, min(timestamps), max(timestamps), "tardis-quotes")]
    assert summary.exit_code == 0

    again = await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    assert [(f.status, f.rows) for f in again.files] == [("skipped", 0)]
    assert await count(engine) == 9999
    assert not (tmp_path / "q.csv").exists()


@pytest.mark.parametrize("packing", ["plain", "gz", "zip"])
@pytest.mark.parametrize("header", [True, False])
async def test_binance_bookticker_csv_imports_the_same_rows_at_millisecond_precision(
    engine: AsyncEngine, real_quotes_text: str, tmp_path: Path, packing: str, header: bool
) -> None:
    rows = file_rows(real_quotes_text)
    path = write(
        tmp_path / "BTCUSDT-bookTicker-2020-02-22.csv",
        binance_csv_text(rows, header=header),
        packing,
    )

    summary = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")

    assert [(f.status, f.format, f.rows) for f in summary.files] == [
        ("imported", "binance-bookticker-csv", 9999)
    ]
    assert await table_rows(engine) == as_ms(rows)


async def test_binance_csv_without_symbol_in_its_name_is_refused_unless_given(
    engine: AsyncEngine, real_quotes_text: str, tmp_path: Path
) -> None:
    rows = file_rows(real_quotes_text)[:50]
    path = tmp_path / "dump.csv"
    path.write_text(binance_csv_text(rows, header=False))

    refused = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")
    assert refused.files[0].status == "refused"
    assert "--symbol" in refused.files[0].message
    assert await count(engine) == 0

    from orderbook_store.files.importers import ImportOptions

    given = await import_paths(
        engine, [path], options=ImportOptions(symbol="BTCUSDT"), quarantine=tmp_path / "q.csv"
    )
    assert given.files[0].rows == 50
    assert await table_rows(engine) == as_ms(rows)


@pytest.mark.parametrize("packing", ["plain", "gz", "zip"])
async def test_websocket_json_lines_import_with_their_receive_time(
    engine: AsyncEngine, real_quotes_text: str, tmp_path: Path, packing: str
) -> None:
    rows = file_rows(real_quotes_text)
    path = write(tmp_path / "ws.jsonl", jsonl_text(rows, receive_time=True), packing)

    summary = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")

    assert [(f.status, f.format, f.rows) for f in summary.files] == [
        ("imported", "binance-bookticker-jsonl", 9999)
    ]
    expected = [(r[0], r[1], r[2] // 1000 * 1000, r[3], *r[4:]) for r in rows]
    assert await table_rows(engine) == expected


async def test_json_lines_without_receive_time_use_the_event_time(
    engine: AsyncEngine, real_quotes_text: str, tmp_path: Path
) -> None:
    rows = file_rows(real_quotes_text)[:100]
    path = tmp_path / "ws.log"
    path.write_text(jsonl_text(rows, receive_time=False))

    await import_paths(engine, [path], quarantine=tmp_path / "q.csv")

    assert await table_rows(engine) == as_ms(rows)


async def test_the_documented_websocket_example_imports(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    message = json.loads(
        (REPO / "tests" / "data" / "binance_futures_bookTicker_ws.json").read_text()
    )
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(message) + "\n")

    await import_paths(engine, [path], quarantine=tmp_path / "q.csv")

    assert await table_rows(engine) == [
        (
            "binance-futures",
            "BNBUSDT",
            1568014460893000,
            1568014460893000,
            Decimal("40.66"),
            Decimal("25.3652"),
            Decimal("25.3519"),
            Decimal("31.21"),
        )
    ]


async def test_book_snapshot_level_zero_is_the_quote(engine: AsyncEngine, tmp_path: Path) -> None:
    summary = await import_paths(engine, [SNAPSHOT], quarantine=tmp_path / "q.csv")

    assert [(f.format, f.rows) for f in summary.files] == [("tardis-book-snapshot", 10)]
    with gzip.open(SNAPSHOT, "rt", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert await table_rows(engine) == [
        (
            r["exchange"],
            r["symbol"],
            int(r["timestamp"]),
            int(r["local_timestamp"]),
            Decimal(r["asks[0].amount"]),
            Decimal(r["asks[0].price"]),
            Decimal(r["bids[0].price"]),
            Decimal(r["bids[0].amount"]),
        )
        for r in records
    ]


@pytest.mark.parametrize("compress", [False, True])
async def test_file_storage_daily_files_import(
    engine: AsyncEngine, real_quotes_text: str, tmp_path: Path, compress: bool
) -> None:
    from orderbook_store.compat import FileStorage

    rows = file_rows(real_quotes_text)
    storage = FileStorage(base_dir=tmp_path / "files", compress=compress)
    await storage.connect()
    for row in rows:
        assert await storage.save_record(dict(zip(COLUMNS, row, strict=True)))
    await storage.shutdown()

    summary = await import_paths(engine, [tmp_path / "files"], quarantine=tmp_path / "q.csv")

    assert sum(f.rows for f in summary.files) == 9999
    assert {f.format for f in summary.files} == {"tardis-quotes"}
    assert sorted(await table_rows(engine)) == sorted(rows)


async def test_broken_lines_are_quarantined_and_the_rest_imports(
    engine: AsyncEngine, real_quotes_text: str, tmp_path: Path
) -> None:
    lines = real_quotes_text.splitlines()
    broken = {
        5: "binance-futures,BTCUSDT,1582329603611000,0.84,9682",  # too few fields
        100: lines[99].rsplit(",", 2)[0] + ",abc,0.5",  # bid price not a number
        2000: lines[1999].rsplit(",", 1)[0] + ",-1",  # negative amount
        7000: "binance-futures,BTCUSDT,1582329603611,1582329603729552,0.84,9682,9681.42,0.031",
        9000: "binance-futures,BTCUSDT,1582329603611000,1582329603729552,0.84,0,9681.42,0.031",
        9500: lines[9499].rsplit(",", 1)[0] + ",1e999999999999999999999",  # beyond Decimal
    }
    for number, line in broken.items():
        lines[number - 1] = line
    path = tmp_path / "broken.csv"
    path.write_text("\n".join(lines) + "\n")
    quarantine = tmp_path / "quarantine.csv"

    summary = await import_paths(engine, [path], quarantine=quarantine)

    assert (summary.files[0].rows, summary.files[0].quarantined) == (9999 - 6, 6)
    assert summary.exit_code == 3
    with quarantine.open() as handle:
        entries = list(csv.DictReader(handle))
    assert [int(e["line"]) for e in entries] == sorted(broken)
    assert all(e["file"] == str(path) for e in entries)
    reasons = {int(e["line"]): e["reason"] for e in entries}
    assert "fields" in reasons[5]
    assert "bid_price" in reasons[100]
    assert "bid_amount" in reasons[2000]
    assert "milliseconds" in reasons[7000]
    assert "ask_price" in reasons[9000]
    assert "bid_amount" in reasons[9500] and "exponent" in reasons[9500]
    assert [e["text"] for e in entries] == [broken[n] for n in sorted(broken)]
    good = [row for i, row in enumerate(file_rows(real_quotes_text), start=2) if i not in broken]
    assert await table_rows(engine) == good


async def test_a_value_beyond_decimals_range_costs_its_line_not_the_next_file(
    engine: AsyncEngine, real_quotes_text: str, tmp_path: Path
) -> None:
    lines = real_quotes_text.splitlines()
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    bad = lines[1].rsplit(",", 2)[0] + ",1e-99999999999999999999,0.5"
    first.write_text("\n".join([lines[0], bad, *lines[2:50]]) + "\n")
    second.write_text("\n".join([lines[0], *lines[50:100]]) + "\n")

    summary = await import_paths(engine, [first, second], quarantine=tmp_path / "q.csv")

    assert [(f.status, f.rows, f.quarantined) for f in summary.files] == [
        ("imported", 48, 1),
        ("imported", 50, 0),
    ]
    assert await count(engine) == 98


async def test_unknown_format_is_refused_naming_the_known_ones(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    path = tmp_path / "quotes.csv"
    path.write_text("time,price,size\n2024-01-01T00:00:00,42000.5,0.1\n")

    summary = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")

    (result,) = summary.files
    assert result.status == "refused"
    assert summary.exit_code == 1
    for name in FORMATS:
        assert name in result.message
    assert await count(engine) == 0


def _cli(settings: Settings, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orderbook_store", *args],
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _env(settings: Settings) -> dict[str, str]:
    assert settings.database_url is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    env["DATABASE_URL"] = settings.database_url.get_secret_value()
    return env


async def test_cli_exit_codes_say_refused_and_quarantined(
    engine: AsyncEngine, settings: Settings, real_quotes_text: str, tmp_path: Path
) -> None:
    unknown = tmp_path / "notes.txt"
    unknown.write_text("hello\n")
    refused = await asyncio.to_thread(_cli, settings, "import", "--quiet", str(unknown))
    assert refused.returncode == 1
    assert "tardis-quotes" in refused.stderr

    lines = real_quotes_text.splitlines()
    lines[10] = "garbage"
    path = tmp_path / "one_bad.csv"
    path.write_text("\n".join(lines) + "\n")
    quarantine = tmp_path / "bad.csv"
    done = await asyncio.to_thread(
        _cli, settings, "import", str(path), "--quarantine", str(quarantine)
    )
    assert done.returncode == 3, done.stderr
    assert "9,998" in done.stdout
    assert await count(engine) == 9998


def _synthetic_file(path: Path, rows: int) -> None:
    walk = QuoteWalk(["ETHUSDT"], seed=5)
    with gzip.open(path, "wt", compresslevel=1) as out:
        out.write(",".join(COLUMNS) + "\n")
        for _ in range(rows // 50_000):
            out.write(
                "".join(",".join(str(q[c]) for c in COLUMNS) + "\n" for q in walk.take(50_000))
            )


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
async def test_import_killed_mid_file_then_rerun_stores_the_file_exactly_once(
    engine: AsyncEngine, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "big.csv.gz"
    rows = 600_000
    await asyncio.to_thread(_synthetic_file, path, rows)
    process = subprocess.Popen(
        [sys.executable, "-m", "orderbook_store", "import", "--quiet", str(path)],
        env=_env(settings),
    )
    try:
        deadline = time.monotonic() + 120
        while await _copy_in_progress(engine) == 0:
            assert process.poll() is None, "the import finished before it could be interrupted"
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # The server ends the dead client's transaction: nothing of the file is left.
    deadline = time.monotonic() + 30
    while await _copy_in_progress(engine):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert await count(engine) == 0
    assert await count(engine, "orderbook_import_files") == 0

    rerun = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")
    assert [(f.status, f.rows) for f in rerun.files] == [("imported", rows)]
    again = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")
    assert [f.status for f in again.files] == ["skipped"]
    assert await count(engine) == rows
    assert await count(engine, "orderbook_import_files") == 1


async def test_verify_matches_then_catches_a_deleted_and_an_altered_row(
    engine: AsyncEngine, real_quotes_path: Path, tmp_path: Path
) -> None:
    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    ok = await verify_paths(engine, [real_quotes_path])
    assert ok.exit_code == 0
    (group,) = ok.files[0].groups
    assert group.file.rows == group.database.rows == 9999

    async with engine.begin() as conn:
        await conn.execute(
            text(
                "DELETE FROM orderbook_data WHERE id = (SELECT min(id) + 4321 FROM orderbook_data)"
            )
        )
    deleted = await verify_paths(engine, [real_quotes_path])
    assert deleted.exit_code == 1
    assert deleted.files[0].status == "mismatch"
    (group,) = deleted.files[0].groups
    assert (group.file.rows, group.database.rows) == (9999, 9998)

    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")  # no-op
    async with engine.begin() as conn:
        await conn.execute(text("TRUNCATE orderbook_data, orderbook_import_files"))
    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE orderbook_data SET bid_amount = bid_amount + 0.00000001 "
                "WHERE id = (SELECT min(id) + 77 FROM orderbook_data)"
            )
        )
    altered = await verify_paths(engine, [real_quotes_path])
    (group,) = altered.files[0].groups
    assert group.file.rows == group.database.rows
    assert group.file.checksum != group.database.checksum
    assert altered.exit_code == 1


async def test_cli_verify_exit_code(
    engine: AsyncEngine, settings: Settings, real_quotes_path: Path, tmp_path: Path
) -> None:
    missing = await asyncio.to_thread(_cli, settings, "verify", str(real_quotes_path))
    assert missing.returncode == 1
    await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    matched = await asyncio.to_thread(_cli, settings, "verify", str(real_quotes_path))
    assert matched.returncode == 0, matched.stdout + matched.stderr


async def test_verify_agrees_with_the_server_on_zero_and_tiny_values(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    path = tmp_path / "edge.csv"
    path.write_text(
        ",".join(COLUMNS)
        + "\n"
        + "binance-futures,XRPUSDT,1704067200000000,1704067200001000,0,0.0001,0.00000001,0.000\n"
        + "binance-futures,XRPUSDT,1704067200000001,1704067200001000,,007.50,0.6,\n"
        + "binance-futures,XRPUSDT,1704067200000002,1704067200001000,1e-3,999999999999.99999999,"
        + "0.62,12\n"
    )
    imported = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")
    assert imported.files[0].rows == 3

    verified = await verify_paths(engine, [path])

    assert verified.exit_code == 0, verified.files[0].groups


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
async def test_a_wrong_value_in_an_otherwise_clean_file_is_quarantined_with_its_text(
    engine: AsyncEngine, real_quotes_text: str, tmp_path: Path, newline: str
) -> None:
    lines = real_quotes_text.splitlines()
    lines[1234] = lines[1234].replace("binance-futures,BTCUSDT,", "binance-futures,BTCUSDT,-", 1)
    path = tmp_path / "one_negative.csv"
    path.write_bytes((newline.join(lines) + newline).encode())
    quarantine = tmp_path / "q.csv"

    summary = await import_paths(engine, [path], quarantine=quarantine)

    assert (summary.files[0].rows, summary.files[0].quarantined) == (9998, 1)
    with quarantine.open() as handle:
        (entry,) = list(csv.DictReader(handle))
    assert (int(entry["line"]), entry["text"]) == (1235, lines[1234])
    assert "timestamp" in entry["reason"]
    assert len(await table_rows(engine)) == 9998


async def test_a_recompressed_copy_of_an_imported_file_adds_nothing(
    engine: AsyncEngine, real_quotes_path: Path, real_quotes_text: str, tmp_path: Path
) -> None:
    first = await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
    assert first.files[0].rows == 9999
    plain = write(tmp_path / "copy.csv", real_quotes_text, "plain")
    zipped = write(tmp_path / "other.csv", real_quotes_text, "zip")

    copies = await import_paths(engine, [plain, zipped], quarantine=tmp_path / "q.csv")

    assert [(f.status, f.rows) for f in copies.files] == [("skipped", 0), ("skipped", 0)]
    assert all(str(real_quotes_path) in f.message for f in copies.files)
    assert await count(engine) == 9999
    assert await count(engine, "orderbook_import_files") == 1


async def test_a_pretty_printed_message_file_imports(engine: AsyncEngine, tmp_path: Path) -> None:
    source = REPO / "tests" / "data" / "binance_futures_bookTicker_ws.json"

    summary = await import_paths(engine, [source], quarantine=tmp_path / "q.csv")

    assert [(f.format, f.rows) for f in summary.files] == [("binance-bookticker-jsonl", 1)]
    assert (await table_rows(engine))[0][1:4] == ("BNBUSDT", 1568014460893000, 1568014460893000)


async def test_a_file_changed_after_its_import_is_refused_not_imported_twice(
    engine: AsyncEngine, real_quotes_text: str, tmp_path: Path
) -> None:
    path = tmp_path / "quotes.csv"
    lines = real_quotes_text.splitlines()
    path.write_text("\n".join(lines[:5000]) + "\n")
    await import_paths(engine, [path], quarantine=tmp_path / "q.csv")
    path.write_text("\n".join(lines) + "\n")  # appended to since

    summary = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")

    assert summary.files[0].status == "refused"
    assert "changed since it was imported" in summary.files[0].message
    assert await count(engine) == 4999


async def test_todays_file_storage_file_waits_for_the_day_to_end(
    engine: AsyncEngine, real_quotes_text: str, tmp_path: Path
) -> None:
    import datetime as dt

    today = dt.datetime.now(dt.timezone.utc).date()
    directory = tmp_path / "binance-futures" / "BTCUSDT"
    directory.mkdir(parents=True)
    (directory / f"{today}.csv").write_text(real_quotes_text)
    (directory / "2020-02-22.csv").write_text(real_quotes_text.replace("BTCUSDT", "ETHUSDT"))

    summary = await import_paths(engine, [tmp_path / "binance-futures"], quarantine=tmp_path / "q")

    assert [(Path(f.file).name, f.status, f.rows) for f in summary.files] == [
        ("2020-02-22.csv", "imported", 9999),
        (f"{today}.csv", "refused", 0),
    ]
    assert "still being written" in summary.files[1].message


async def test_two_importers_given_the_same_file_at_once_store_it_once(
    engine: AsyncEngine, real_quotes_path: Path, tmp_path: Path
) -> None:
    first, second = await asyncio.gather(
        import_paths(engine, [real_quotes_path], quarantine=tmp_path / "a.csv"),
        import_paths(engine, [real_quotes_path], quarantine=tmp_path / "b.csv"),
    )

    statuses = sorted([first.files[0].status, second.files[0].status])
    assert statuses == ["imported", "skipped"]
    assert await count(engine) == 9999


def test_vectorized_checks_accept_and_reject_exactly_what_to_row_does() -> None:
    import itertools

    import pyarrow as pa

    from orderbook_store.errors import InvalidQuote
    from orderbook_store.files.importers.rows import check
    from orderbook_store.quote import to_row

    decimals = ["9681.92", "0", "0.0", "00.5", "1.", ".5", "1e-3", "+1", " 1", "-0.1",
                "0.000000001", "0.00000001", "123456789012", "1234567890123", "NaN", "", None,
                "1.000000000", "abc"]  # fmt: skip
    names = [("binance-futures", "BTCUSDT"), ("a,b", "BTCUSDT"), ("x", 'BTC"USDT'),
             ("binance-futures", "B" * 21), ("binance-futures", ""), ("tab\there", "X"),
             (None, "ETHUSDT")]  # fmt: skip
    stamps = ["1582329601096000", "1582329601096", "abc", "", "4102444800000000", "-5",
              "1262304000000000"]  # fmt: skip
    records = []
    for line, (value, (exchange, symbol), stamp) in enumerate(
        itertools.product(decimals, names, stamps), start=1
    ):
        records.append(
            {
                "line": line,
                "exchange": exchange,
                "symbol": symbol,
                "timestamp": stamp or None,
                "local_timestamp": "1582329603502092",
                "ask_amount": value,
                "ask_price": value,
                "bid_price": "9681.92",
                "bid_amount": value,
            }
        )
    table = pa.Table.from_pylist(records)

    checked = check(table)

    expected_rows, expected_lines = [], []
    for record in records:
        candidate = dict(record)
        for key in ("timestamp", "local_timestamp"):
            value = candidate[key]
            candidate[key] = int(value) if isinstance(value, str) and value.isdigit() else value
        try:
            expected_rows.append(to_row(candidate))
        except InvalidQuote:
            expected_lines.append(record["line"])
    assert [entry.line for entry in checked.rejected] == expected_lines
    got = [tuple(row.values()) for row in checked.rows.to_pylist()]
    assert got == expected_rows
    assert len(expected_rows) > 10 and len(expected_lines) > 10


async def test_quoted_names_with_commas_are_stored_literally(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    path = tmp_path / "quoted.csv"
    path.write_text(
        ",".join(COLUMNS)
        + "\n"
        + 'binance-futures,"ODD,SYM",1704067200000000,1704067200001000,1,2,1.5,3\n'
        + 'binance-futures,"Q""T",1704067200000001,1704067200001000,1,2,1.5,3\n'
        + "binance-futures,BTCUSDT,1704067200000002,1704067200001000,1,2,1.5,3\n"
    )

    summary = await import_paths(engine, [path], quarantine=tmp_path / "q.csv")

    assert summary.files[0].rows == 3
    assert [row[1] for row in await table_rows(engine)] == ["ODD,SYM", 'Q"T', "BTCUSDT"]
    assert (await verify_paths(engine, [path])).exit_code == 0


async def test_a_line_that_is_not_utf8_is_quarantined(
    engine: AsyncEngine, real_quotes_text: str, tmp_path: Path
) -> None:
    lines = [line.encode() for line in real_quotes_text.splitlines()[:100]]
    lines[41] = b"binance-futures,BTC\xffUSDT,1582329603611000,1582329603729552,0.84,9682,9681.4,1"
    path = tmp_path / "latin.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    quarantine = tmp_path / "q.csv"

    summary = await import_paths(engine, [path], quarantine=quarantine)

    assert (summary.files[0].rows, summary.files[0].quarantined) == (98, 1)
    with quarantine.open() as handle:
        (entry,) = list(csv.DictReader(handle))
    assert (entry["line"], entry["reason"]) == ("42", "is not valid UTF-8 text")


_PEAK_RSS_CHILD = """
import asyncio, resource, sys
from pathlib import Path
from orderbook_store.engine import create_engine
from orderbook_store.files.importers import import_paths
from orderbook_store.settings import Settings

async def main():
    engine = create_engine(Settings())
    try:
        summary = await import_paths(engine, [Path(sys.argv[1])], quarantine=Path(sys.argv[2]))
    finally:
        await engine.dispose()
    print(summary.rows + summary.duplicates, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

asyncio.run(main())
"""


@pytest.mark.slow
async def test_import_memory_does_not_grow_with_the_file(
    engine: AsyncEngine, settings: Settings, tmp_path: Path
) -> None:
    small, large = tmp_path / "small.csv.gz", tmp_path / "large.csv.gz"
    await asyncio.to_thread(_synthetic_file, small, 200_000)
    await asyncio.to_thread(_synthetic_file, large, 1_000_000)
    peaks = {}
    for path in (small, large):
        done = await asyncio.to_thread(
            run_command,  # a failure shows the child's stderr
            [sys.executable, "-c", _PEAK_RSS_CHILD, str(path), str(tmp_path / "q.csv")],
            env=_env(settings),
            timeout_s=600,
        )
        rows, peak_kib = map(int, done.stdout.split())
        peaks[rows] = peak_kib
    # Five times the rows (about 70 MB more decompressed text, and far more as Arrow
    # tables, were the file loaded whole): the peak grows by little more than noise
    # (measured here: 260 MB -> 280 MB).
    assert sorted(peaks) == [200_000, 1_000_000]
    assert peaks[1_000_000] - peaks[200_000] < 64 * 1024, peaks
