"""``orderbook-store`` through its console script, as an operator runs it: every command and
option, ``--json`` for machines, and one line (never a traceback) for each ordinary mistake.

Each run is a real process with a clean environment (no ``DB_*``, ``PG*`` or ``.env`` of the
developer's) against real databases; a server that cannot be reached is 127.0.0.1:1.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from orderbook_store.cli import app
from orderbook_store.ops import migrations
from orderbook_store.settings import Settings

from lakes import LakeConfig
from pgserver import admin_execute
from s3server import S3Server

pytestmark = pytest.mark.slow

ENTRY_POINT = Path(sys.executable).with_name("orderbook-store")
REAL_QUOTES = Path(__file__).parent / "data" / "tardis_quotes_BTCUSDT_2020-02-22.csv.gz"
UNREACHABLE = "postgresql://collector:Pw-unreachable-Secret@127.0.0.1:1/quotes?sslmode=disable"

#: The newest revision: what a database upgraded without a target is at.
HEAD = migrations.head_revision() or ""

MakeDb = Callable[[], str]


def run(
    *args: str, url: str | None, cwd: Path, **variables: str
) -> subprocess.CompletedProcess[str]:
    """The console script with ``args``, ``DATABASE_URL=url`` and nothing else configured
    (no ``DB_*``, ``PG*`` or ``LAKE_*`` of the developer's)."""
    assert ENTRY_POINT.exists(), f"no console script at {ENTRY_POINT}: pip install -e ."
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DB_", "PG", "LAKE_")) and k != "DATABASE_URL"
    }
    if url is not None:
        env["DATABASE_URL"] = url
    env["DB_SPOOL_DIR"] = str(cwd / "spool")
    env.update(variables)
    return subprocess.run(
        [str(ENTRY_POINT), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def on(url: str | None, cwd: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run`` bound to one database and directory."""

    def bound(*args: str, **variables: str) -> subprocess.CompletedProcess[str]:
        return run(*args, url=url, cwd=cwd, **variables)

    return bound


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command printed on stderr (and it did fail)."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def migrated(make_database: MakeDb) -> str:
    url = make_database()
    migrations.upgrade(Settings(database_url=url), "head")
    return url


@pytest.fixture
def empty(make_database: MakeDb) -> str:
    return make_database()


def _revision(url: str) -> str | None:
    return migrations.database_revision(Settings(database_url=url))


# -- the root: --version, --help, --debug -------------------------------------------------


def test_version_and_help(tmp_path: Path) -> None:
    from importlib.metadata import version

    assert ok(run("--version", url=None, cwd=tmp_path)).strip() == (
        f"orderbook-store {version('orderbook_store')}"
    )
    shown = ok(run("--help", url=None, cwd=tmp_path))
    for command in ("upgrade", "stamp", "import", "verify", "export", "doctor", "partitions"):
        assert command in shown
    assert "--debug" in shown and "--version" in shown
    module = subprocess.run(
        [sys.executable, "-m", "orderbook_store.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert module.stdout.startswith("orderbook-store ")


def test_debug_adds_the_traceback_without_the_password(tmp_path: Path) -> None:
    plain = run("upgrade", url=UNREACHABLE, cwd=tmp_path)
    line = one_line(plain)
    assert line.startswith("orderbook-store: cannot connect to PostgreSQL at 127.0.0.1:1")
    debug = run("--debug", "upgrade", url=UNREACHABLE, cwd=tmp_path)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == line
    assert "Pw-unreachable-Secret" not in debug.stdout + debug.stderr + plain.stderr


# -- ordinary mistakes: one line naming the problem and the fix ----------------------------


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    for command in ("import", "verify"):
        line = one_line(run(command, str(tmp_path / "nope.csv.gz"), url=UNREACHABLE, cwd=tmp_path))
        assert "nope.csv.gz" in line and "does not exist" in line
    quarantine = str(tmp_path / "no-such-dir" / "q.csv")
    line = one_line(
        run("import", str(REAL_QUOTES), "--quarantine", quarantine, url=UNREACHABLE, cwd=tmp_path)
    )
    assert "--quarantine" in line and "does not exist" in line


def test_an_unknown_revision_is_one_line(migrated: str, tmp_path: Path) -> None:
    line = one_line(run("upgrade", "9999", url=migrated, cwd=tmp_path))
    assert "unknown revision '9999'" in line and "0004" in line
    line = one_line(run("stamp", "9999", url=migrated, cwd=tmp_path))
    assert "unknown revision '9999'" in line


@pytest.mark.parametrize(
    "args",
    [
        ["upgrade"],
        ["stamp", "0001"],
        ["import", str(REAL_QUOTES)],
        ["verify", str(REAL_QUOTES)],
        ["export", "--symbol", "BTCUSDT", "--start", "2020-02-22", "--end", "2020-02-23"],
        ["partitions", "list"],
        ["partitions", "ensure"],
        ["partitions", "prune", "--older-than", "90d", "--yes"],
    ],
    ids=lambda args: "-".join(a for a in args if not a.startswith("/"))[:40],
)
def test_an_unreachable_server_is_one_line(args: list[str], tmp_path: Path) -> None:
    if args[0] == "export":
        args = [*args, "--out", str(tmp_path / "out")]
    line = one_line(run(*args, url=UNREACHABLE, cwd=tmp_path))
    assert "cannot connect to PostgreSQL at 127.0.0.1:1" in line
    assert "check that the server is running" in line
    assert "Pw-unreachable-Secret" not in line


@pytest.mark.parametrize(
    "args",
    [
        ["import", str(REAL_QUOTES)],
        ["verify", str(REAL_QUOTES)],
        ["export", "--symbol", "BTCUSDT", "--start", "2020-02-22", "--end", "2020-02-23"],
        ["partitions", "list"],
        ["partitions", "ensure"],
    ],
    ids=lambda args: "-".join(a for a in args if not a.startswith("/"))[:40],
)
def test_a_database_never_migrated_is_one_line_naming_upgrade(
    args: list[str], empty: str, tmp_path: Path
) -> None:
    if args[0] == "export":
        args = [*args, "--out", str(tmp_path / "out")]
    line = one_line(run(*args, url=empty, cwd=tmp_path))
    assert "orderbook-store upgrade" in line


@pytest.fixture
def unprivileged(server_url: str, empty: str) -> Iterator[str]:
    """The URL of a fresh database for a login role that may create nothing in it."""
    role = f"obs_cli_np_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(admin_execute(server_url, f"CREATE ROLE {role} LOGIN"))
    asyncio.run(admin_execute(empty, "REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
    parts = urlsplit(empty)
    netloc = f"{role}@{parts.hostname}:{parts.port}"
    try:
        yield urlunsplit(parts._replace(netloc=netloc))
    finally:
        asyncio.run(admin_execute(server_url, f"DROP ROLE IF EXISTS {role}"))


def test_upgrade_as_a_role_without_privileges_is_one_line(
    unprivileged: str, tmp_path: Path
) -> None:
    line = one_line(run("upgrade", url=unprivileged, cwd=tmp_path))
    assert "permission denied" in line
    assert "owner role runs upgrade" in line and "roles --print-sql" in line


def test_stamp_refuses_to_record_an_older_revision_without_force(
    migrated: str, tmp_path: Path
) -> None:
    line = one_line(run("stamp", "0001", url=migrated, cwd=tmp_path))
    assert f"at revision {HEAD}" in line and "--force" in line
    assert _revision(migrated) == HEAD

    forced = json.loads(ok(run("stamp", "0003", "--force", "--json", url=migrated, cwd=tmp_path)))
    assert forced == {"previous": HEAD, "revision": "0003"}
    # The schema is head's while its record says 0003: the upgrade says so in one line.
    line = one_line(run("upgrade", url=migrated, cwd=tmp_path))
    assert "does not match the revision recorded" in line and "stamp REVISION --force" in line

    assert f"database stamped at {HEAD} (was 0003)" in ok(
        run("stamp", "head", "--force", url=migrated, cwd=tmp_path)
    )
    assert f"database already at {HEAD}" in ok(run("stamp", HEAD, url=migrated, cwd=tmp_path))


def test_upgrade_never_goes_back_and_reports_json(empty: str, tmp_path: Path) -> None:
    assert "database not migrated" in ok(run("current", url=empty, cwd=tmp_path))
    upgraded = json.loads(ok(run("upgrade", "0002", "--json", url=empty, cwd=tmp_path)))
    assert upgraded == {"previous": None, "revision": "0002"}
    assert json.loads(ok(run("current", "--json", url=empty, cwd=tmp_path))) == {
        "revision": "0002",
        "head": HEAD,
        "at_head": False,
    }
    assert f"database upgraded to {HEAD} (was 0002)" in ok(run("upgrade", url=empty, cwd=tmp_path))
    line = one_line(run("upgrade", "0002", url=empty, cwd=tmp_path))
    assert "past 0002" in line and "alembic downgrade 0002" in line
    assert _revision(empty) == HEAD


@pytest.mark.parametrize(
    ("args", "option", "value"),
    [
        (["partitions", "ensure", "--since", "not-a-date"], "--since", "not-a-date"),
        (["partitions", "ensure", "--since", "2024-02-30"], "--since", "2024-02-30"),
        (["partitions", "ensure", "--since", "2009-12-31"], "--since", "2009-12-31"),
        (["partitions", "ensure", "--period", "year"], "--period", "year"),
        (["partitions", "ensure", "--ahead", "-1"], "--ahead", ""),
        (["partitions", "ensure", "--ahead", "many"], "--ahead", ""),
        (["partitions", "ensure", "--lock-timeout", "0"], "--lock-timeout", ""),
        (["partitions", "compact", "--period", "year"], "--period", "year"),
        (["partitions", "compact", "--lock-timeout", "0"], "--lock-timeout", ""),
        (["partitions", "prune", "--older-than", "5x"], "--older-than", "5x"),
        (["partitions", "prune", "--older-than", "99999999999d"], "--older-than", "99999999999d"),
        (["archive", "--older-than", "5x"], "--older-than", "5x"),
        (["restore", "--start", "soon", "--end", "2024-01-02"], "--start", "soon"),
        (["restore", "--start", "2024-01-02", "--end", "2024-01-01"], "--end", "2024-01-01"),
        (["export", "--start", "yesterday"], "--start", "yesterday"),
        (["export", "--end", "2024-13-01"], "--end", "2024-13-01"),
        (["export", "--end", "99999999999999999999"], "--end", "99999999999999999999"),
        (["export", "--start", "2024-01-02", "--end", "2024-01-01"], "--end", "2024-01-01"),
        (["roles", "--print-sql", "--writer", "Robert'); DROP"], "writer", "Robert"),
        (["roles", "--print-sql", "--schema", "a b"], "schema", "a b"),
        (["upgrade", "--json", "--jsn"], "--jsn", ""),
    ],
    ids=lambda part: part if isinstance(part, str) else None,
)
def test_a_bad_option_value_is_one_line_naming_the_option_and_the_value(
    args: list[str], option: str, value: str, tmp_path: Path
) -> None:
    if args[0] == "export":  # a whole command; the option under test comes last and wins
        base = ["--symbol", "BTCUSDT", "--start", "2024-01-01", "--end", "2024-01-02"]
        args = ["export", *base, "--out", str(tmp_path / "out"), *args[1:]]
    result = run(*args, url=UNREACHABLE, cwd=tmp_path)
    line = one_line(result)  # before connecting: the server here cannot be reached
    assert "cannot connect" not in line
    assert option in line and value in line


def test_doctor_prints_brackets_in_names_as_text(server_url: str, tmp_path: Path) -> None:
    parts = urlsplit(server_url)
    variables = {
        "DB_HOST": parts.hostname or "127.0.0.1",
        "DB_PORT": str(parts.port or 5432),
        "DB_USER": parts.username or "postgres",
        "DB_NAME": "q[/x]",
        "DB_SSLMODE": "disable",
    }
    table = run("doctor", url=None, cwd=tmp_path, **variables)
    assert table.returncode == 1, table.stderr  # no such database: a failed check
    assert "Traceback" not in table.stderr and "MarkupError" not in table.stderr
    assert "q[/x]" in table.stdout.replace("\n", "")
    report = json.loads(run("doctor", "--json", url=None, cwd=tmp_path, **variables).stdout)
    assert "q[/x]" in report["target"]


# -- every command and option, and --json for each that reports -----------------------------


def test_import_verify_export_with_every_option(migrated: str, tmp_path: Path) -> None:
    cli = on(migrated, tmp_path)
    quarantine = str(tmp_path / "rejected.csv")
    imported = json.loads(ok(cli("import", str(REAL_QUOTES), "--quarantine", quarantine, "--json")))
    assert (imported["imported"], imported["rows"], imported["exit_code"]) == (1, 9999, 0)
    assert imported["files"][0]["format"] == "tardis-quotes"

    dump = tmp_path / "dump.csv"  # a Binance CSV whose name does not carry the symbol
    dump.write_text(
        "update_id,best_bid_price,best_bid_qty,best_ask_price,best_ask_qty,transaction_time,"
        "event_time\n"
        "1,2300.5,1.5,2300.6,2.25,1704067200000,1704067200001\n"
        "2,2300.4,0.5,2300.7,1.25,1704067201000,1704067201002\n"
    )
    refused = cli("import", str(dump), "-q")
    assert refused.returncode == 1 and "--symbol" in refused.stderr
    assert ok(cli("import", str(dump), "--symbol", "ETHUSDT", "--quiet")) == ""

    both = [str(REAL_QUOTES), str(dump), "--symbol", "ETHUSDT"]
    verified = json.loads(ok(cli("verify", *both, "--json")))
    assert verified["ok"] is True
    groups = [group for file in verified["files"] for group in file["groups"]]
    assert {(g["symbol"], g["file"]["rows"]) for g in groups} == {
        ("BTCUSDT", 9999),
        ("ETHUSDT", 2),
    }
    assert ok(cli("verify", str(REAL_QUOTES), "--quiet")) == ""
    assert "ok" in ok(cli("verify", str(REAL_QUOTES)))

    out = ["--symbol", "BTCUSDT", "--out", str(tmp_path / "lake")]
    first = ["--start", "2020-02-22", "--end", "2020-02-22T00:02:00Z"]
    exported = json.loads(ok(cli("export", *out, *first, "--json")))
    assert exported["rows"] > 0 and len(exported["files"]) == 1
    assert Path(exported["files"][0]).is_file()
    later = ["--start", "1582329720000000", "--end", "2020-02-23"]  # µs work too
    assert ok(cli("export", *out, *later, "--quiet")) == ""
    said = ok(cli("export", *out, *later))
    assert f"exported {9999 - exported['rows']:,} rows" in said

    # Another file holding one of those quotes and a new one: the stored one is skipped...
    overlapping = tmp_path / "overlap.csv"
    overlapping.write_text(
        dump.read_text().splitlines()[0] + "\n"
        "2,2300.4,0.5,2300.7,1.25,1704067201000,1704067201002\n"
        "3,2300.3,0.5,2300.8,1.25,1704067202000,1704067202003\n"
    )
    again = json.loads(ok(cli("import", str(overlapping), "--symbol", "ETHUSDT", "--json")))
    assert (again["rows"], again["duplicates"]) == (1, 1)
    assert again["files"][0]["duplicates"] == 1
    # ...unless asked to keep every row (a fourth file, so the ledger has not seen it).
    kept = tmp_path / "kept.csv"
    kept.write_text(overlapping.read_text().replace("2300.8", "2300.9"))
    every = ["--symbol", "ETHUSDT", "--allow-duplicates", "--json"]
    forced = json.loads(ok(cli("import", str(kept), *every)))
    assert (forced["rows"], forced["duplicates"]) == (2, 0)
    overlapped = cli("verify", str(dump), "--symbol", "ETHUSDT", "--json")
    assert overlapped.returncode == 3, overlapped.stderr  # every row there, and more
    (group,) = json.loads(overlapped.stdout)["files"][0]["groups"]
    # the second copy of quote 2, kept by --allow-duplicates (quote 3 is outside the range)
    assert (group["status"], group["missing"], group["extra"]) == ("overlap", 0, 1)


def test_partitions_ensure_since_creates_a_backfill_s_days(migrated: str, tmp_path: Path) -> None:
    cli = on(migrated, tmp_path)
    today = dt.datetime.now(dt.timezone.utc).date()
    since = today - dt.timedelta(days=20)
    first = f"orderbook_data_p{since:%Y%m%d}"
    options = ["--ahead", "3", "--period", "day", "--lock-timeout", "5", "--json"]
    ensured = json.loads(ok(cli("partitions", "ensure", "--since", since.isoformat(), *options)))
    assert ensured["since"] == since.isoformat() and ensured["period"] == "day"
    assert first in ensured["created"]
    listed = [json.loads(line) for line in ok(cli("partitions", "list", "--json")).splitlines()]
    starts = {part["start"][:10] for part in listed if part["start"]}
    for k in range(20 + 4):
        assert (since + dt.timedelta(days=k)).isoformat() in starts
    said = ok(cli("partitions", "ensure", "--since", since.isoformat()))
    assert "0 created" in said and f"since {since.isoformat()}" in said
    assert first in ok(cli("partitions", "list"))

    # Compaction: rows in a closed day are rewritten in order, every one kept.
    old_day_us = int(dt.datetime.combine(since, dt.time(), dt.timezone.utc).timestamp()) * 1_000_000
    asyncio.run(
        admin_execute(
            migrated,
            "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) "
            f"SELECT 'BTCUSDT', {old_day_us} + g, {old_day_us} + g FROM generate_series(1, 500) g",
        )
    )
    assert f"would compact {first}" in ok(cli("partitions", "compact", "--dry-run"))
    compact = ["--period", "day", "--lock-timeout", "1", "--json"]
    compacted = json.loads(ok(cli("partitions", "compact", *compact)))
    rows = {c["source"]: c["rows"] for c in compacted["compacted"]}
    assert rows[first] == 500 and sum(rows.values()) == 500  # every closed day, empty or not
    again = json.loads(ok(cli("partitions", "compact", "--json")))
    assert again["compacted"] == [] and again["already_compacted"] >= 1

    would = json.loads(ok(cli("partitions", "prune", "--older-than", "7d", "--dry-run", "--json")))
    assert would["dry_run"] is True and first in would["dropped"]
    assert "would drop" in ok(cli("partitions", "prune", "--older-than", "7d", "--dry-run"))
    archive = ["--archive", str(tmp_path / "archive"), "--json"]
    archived = json.loads(ok(cli("partitions", "prune", "--older-than", "15d", *archive)))
    assert archived["dry_run"] is False and first in archived["dropped"]
    assert "partitions dropped" in ok(cli("partitions", "prune", "--older-than", "7d", "--yes"))


def test_archive_prune_and_restore_with_a_lake(
    migrated: str, tmp_path: Path, lake_config: LakeConfig
) -> None:
    cli = on(migrated, tmp_path)
    today = dt.datetime.now(dt.timezone.utc).date()
    old = today - dt.timedelta(days=20)
    recent = today - dt.timedelta(days=3)
    ok(cli("partitions", "ensure", "--since", old.isoformat(), "--period", "day"))
    for day, rows in ((old, 500), (recent, 10)):
        start_us = int(dt.datetime.combine(day, dt.time(), dt.timezone.utc).timestamp()) * 10**6
        asyncio.run(
            admin_execute(
                migrated,
                "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp, ask_price) "
                f"SELECT 'BTCUSDT', {start_us} + g, {start_us} + g, 1.5 "
                f"FROM generate_series(1, {rows}) g",
            )
        )
    first = f"orderbook_data_p{old:%Y%m%d}"
    lake = lake_config.env

    unset = cli("archive", "--older-than", "15d")
    assert unset.returncode != 0 and "LAKE_URL" in one_line(unset)
    archived = cli("archive", "--older-than", "15d", "--json", **lake)
    assert lake_config.values.get("lake_secret_access_key", "-") not in archived.stderr
    document = json.loads(ok(archived))
    assert document["rows"] == 500 and first in [a["name"] for a in document["archived"]]
    assert f"archived {first}: 500 rows, 1 files" in archived.stderr
    again = ok(cli("archive", "--older-than", "15d", **lake))
    assert f"{first} is archived already (500 rows)" in again
    assert "0 partitions archived" in again and "5 archived already" in again

    both = cli("partitions", "prune", "--older-than", "15d", "--archive", "x", **lake)
    assert both.returncode != 0 and "LAKE_URL" in one_line(both)
    pruned = ok(cli("partitions", "prune", "--older-than", "15d", **lake))
    assert f"dropped {first} (500 rows)" in pruned and "partitions dropped, 500 rows" in pruned

    span = ["--start", old.isoformat(), "--end", (old + dt.timedelta(days=1)).isoformat()]
    restored = json.loads(ok(cli("restore", *span, "--json", **lake)))
    assert (restored["rows_read"], restored["rows_added"]) == (500, 500)
    second = ok(cli("restore", *span, "--symbol", "BTCUSDT", **lake))
    assert "restored 0 rows from 1 files (500 were stored already)" in second

    # the lake's secret key never shows, even when the store cannot be reached
    secret = "Lake-Secret-" + secrets.token_hex(8)
    s3 = {
        "LAKE_URL": "s3://quotes/archive",
        "LAKE_ENDPOINT_URL": "http://127.0.0.1:1",
        "LAKE_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "LAKE_SECRET_ACCESS_KEY": secret,
        "AWS_MAX_ATTEMPTS": "1",
    }
    failed = cli("archive", "--older-than", "1d", **s3)
    assert failed.returncode != 0
    assert f"orderbook_data_p{recent:%Y%m%d}" in failed.stdout + failed.stderr
    for result in (failed, cli("--debug", "archive", "--older-than", "1d", "--json", **s3)):
        assert secret not in result.stdout + result.stderr


def test_export_without_out_goes_to_the_lake_lake_url_names(
    migrated: str, tmp_path: Path, lake_config: LakeConfig
) -> None:
    cli = on(migrated, tmp_path)
    ok(cli("import", str(REAL_QUOTES), "--quiet"))
    span = ["--symbol", "BTCUSDT", "--start", "2020-02-22", "--end", "2020-02-23"]
    line = one_line(cli("export", *span))
    assert "--out" in line and "LAKE_URL" in line

    exported = cli("export", *span, "--json", **lake_config.env)
    said = cli("export", *span, **lake_config.env)

    document = json.loads(ok(exported))
    assert document["rows"] == 9999
    lake = lake_config.open()
    name = "exchange=binance-futures/symbol=BTCUSDT/date=2020-02-22/part-"
    assert [f.removeprefix("s3://") for f in document["files"]] == [
        lake.path(name + "1582329600000000-1582416000000000.parquet")
    ]
    assert document["files"][0].startswith("/" if lake.is_local else "s3://")
    assert f"exported 9,999 rows into 1 files under {lake.url}" in " ".join(ok(said).split())
    secret = lake_config.values.get("lake_secret_access_key")
    if secret is not None:
        for result in (exported, said):
            assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize("debug", [[], ["--debug"]], ids=["plain", "debug"])
def test_the_lakes_secret_key_never_appears_in_export_output(
    migrated: str, tmp_path: Path, s3: S3Server, debug: list[str]
) -> None:
    cli = on(migrated, tmp_path)
    ok(cli("import", str(REAL_QUOTES), "--quiet"))
    secret = "Wrong-Lake-Secret/" + secrets.token_hex(8)
    lake = {
        "LAKE_ENDPOINT_URL": s3.endpoint_url,
        "LAKE_REGION": s3.region,
        "LAKE_ACCESS_KEY_ID": "AKIAWRONGKEY",
        "LAKE_SECRET_ACCESS_KEY": secret,
    }
    span = ["--symbol", "BTCUSDT", "--start", "2020-02-22", "--end", "2020-02-23"]

    missing = cli(*debug, "export", *span, LAKE_URL="s3://no-such-bucket/quotes", **lake)
    bad_endpoint = cli(
        *debug,
        "export",
        *span,
        **{**lake, "LAKE_URL": "s3://bucket/q", "LAKE_ENDPOINT_URL": "ftp://" + secret},
    )

    assert missing.returncode != 0 and "no-such-bucket" in missing.stderr
    assert bad_endpoint.returncode != 0 and "LAKE_ENDPOINT_URL" in bad_endpoint.stderr
    for result in (missing, bad_endpoint):
        assert secret not in result.stdout + result.stderr
        assert "Wrong-Lake-Secret" not in result.stdout + result.stderr
    if not debug:
        line = one_line(missing)
        assert "the lake s3://no-such-bucket/quotes cannot be used" in line
        assert "LAKE_SECRET_ACCESS_KEY" in line  # named as a thing to check, never its value
        assert "LAKE_ENDPOINT_URL='ftp://***'" in one_line(bad_endpoint)


def test_doctor_roles_and_dead_letters(migrated: str, tmp_path: Path) -> None:
    cli = on(migrated, tmp_path)
    report = json.loads(ok(cli("doctor", "--json")))
    assert report["ok"] is True
    assert "all good" in ok(cli("doctor"))

    names = ["--owner", "q_owner", "--writer", "q_writer", "--reader", "q_reader"]
    sql = ok(cli("roles", "--print-sql", *names, "--schema", "quotes"))
    for name in ("q_owner", "q_writer", "q_reader", "quotes"):
        assert name in sql
    refused = cli("roles")
    assert refused.returncode == 2 and "--print-sql" in one_line(refused)

    assert json.loads(ok(cli("dead-letters", "--json"))) == []
    assert "0 refused row(s)" in ok(cli("dead-letters"))


def test_every_command_and_option_is_known_to_these_tests() -> None:
    """A new command or option fails here until a test above runs it through the script."""
    import typer.main

    tested = {
        "": {"--debug", "--version"},
        "upgrade": {"--json"},
        "stamp": {"--force", "--json"},
        "current": {"--json"},
        "import": {"--quarantine", "--symbol", "--allow-duplicates", "--quiet", "--json"},
        "verify": {"--symbol", "--quiet", "--json"},
        "export": {"--symbol", "--start", "--end", "--out", "--quiet", "--json"},
        "doctor": {"--json"},
        "roles": {"--print-sql", "--owner", "--writer", "--reader", "--schema"},
        "dead-letters": {"--json"},
        "partitions": set(),
        "partitions ensure": {"--ahead", "--period", "--since", "--lock-timeout", "--json"},
        "partitions list": {"--json"},
        "partitions compact": {"--period", "--lock-timeout", "--dry-run", "--json"},
        "partitions prune": {"--older-than", "--archive", "--yes", "--dry-run", "--json"},
        "archive": {"--older-than", "--json"},
        "restore": {"--start", "--end", "--symbol", "--json"},
    }
    found: dict[str, set[str]] = {}

    def walk(command: object, path: str) -> None:
        params = getattr(command, "params", [])
        found[path] = {
            opt for param in params for opt in getattr(param, "opts", []) if opt.startswith("--")
        }
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    assert found == tested


def test_the_import_bar_shows_file_names_as_text() -> None:
    """On a terminal the bar names the file being read: a name is never read as markup."""
    import io

    from rich.console import Console

    from orderbook_store.cli.files import _Bar

    screen = io.StringIO()
    bar = _Bar(Console(file=screen, force_terminal=True, width=120))
    with bar.progress:
        bar.file_started("/data/[bold]q[red]2024.csv.gz", 0, 2)
        bar.progress.refresh()
    assert "[bold]q[red]2024.csv.gz" in screen.getvalue()


def test_a_lost_connection_and_an_unexpected_error_are_one_line_each() -> None:
    import asyncpg
    from sqlalchemy.exc import DBAPIError

    from orderbook_store.cli.failures import explain

    lost = DBAPIError("COPY ...", {}, asyncpg.exceptions.ConnectionDoesNotExistError("closed"))
    assert explain(lost).startswith("the connection to the server was lost (closed)")
    line = explain(ValueError("something\nunforeseen"))
    assert line == (
        "unexpected error (ValueError: something); run again with `orderbook-store --debug "
        "...` to see where, and report it"
    )
