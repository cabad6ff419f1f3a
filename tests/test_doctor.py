"""``orderbook-store doctor``: a healthy database passes; each kind of trouble is named and fails.

Problems are made for real: a database never migrated, an index left invalid by a failed
``CREATE INDEX CONCURRENTLY``, spool files left by a stopped writer, a server that is down.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from orderbook_store.cli import app as cli_app
from orderbook_store.engine import create_engine
from orderbook_store.ops import migrations, partitions
from orderbook_store.ops.doctor import PARTITIONS_AHEAD_WARN_DAYS, run_checks, spool_directory
from orderbook_store.pg.copy_in import encode_copy_text
from orderbook_store.quote import to_row
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk
from orderbook_store.write.spool import Spool

from pgserver import free_port

EXPECTED_CHECKS = {
    "connection",
    "tls",
    "server",
    "timeouts",
    "connections",
    "migrations",
    "table",
    "partitions",
    "compaction",
    "indexes",
    "clock",
    "spool",
    "dead letters",
}


def cli_env(settings: Settings, spool_dir: Path) -> dict[str, str]:
    assert settings.database_url is not None
    return {
        "DATABASE_URL": settings.database_url.get_secret_value(),
        "DB_SPOOL_DIR": str(spool_dir),
    }


async def test_a_healthy_database_passes(settings: Settings, tmp_path: Path) -> None:
    report = await run_checks(settings.model_copy(update={"spool_dir": tmp_path}))
    assert report.ok, report.as_dict()
    assert {check.name for check in report.checks} == EXPECTED_CHECKS
    assert report.check("migrations").value == f"at head {migrations.head_revision()}"
    assert report.check("indexes").status == "ok"
    assert report.check("spool").value == "empty"
    assert report.check("server").value.startswith("PostgreSQL ")
    assert "ms round trip" in report.check("connection").value
    assert "database" in report.check("clock").value
    # loopback without TLS is information, not a failure
    assert report.check("tls").status == "info"


async def test_session_timeouts_reach_the_server(settings: Settings, tmp_path: Path) -> None:
    tuned = settings.model_copy(
        update={
            "statement_timeout_ms": 1500,
            "idle_in_transaction_session_timeout_ms": 45_000,
            "spool_dir": tmp_path,
        }
    )
    report = await run_checks(tuned)
    assert report.check("timeouts").value == (
        "statement_timeout=1500ms, idle_in_transaction_session_timeout=45s"
    )


async def test_partitions_ahead_are_reported(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    # `engine` empties the table: rows other tests left in the default partition would warn.
    report = await run_checks(settings.model_copy(update={"spool_dir": tmp_path}))
    partitions = report.check("partitions")
    assert partitions.status == "ok", partitions
    count, _, ahead, *_ = partitions.value.split()
    assert int(count) >= 3
    assert float(ahead) >= PARTITIONS_AHEAD_WARN_DAYS


async def test_running_out_of_partitions_fails(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    url = await asyncio.to_thread(make_database)
    settings = Settings(database_url=url, spool_dir=tmp_path)
    await asyncio.to_thread(migrations.upgrade, settings, "head")
    engine = create_engine(settings)
    try:
        future = [
            p
            for p in await partitions.list_partitions(engine)
            if p.end_us is not None and p.end_us > time.time() * 1e6 + 86_400e6
        ]
    finally:
        await engine.dispose()
    conn = await asyncpg.connect(url)
    try:
        for part in future:  # keep today's and tomorrow's, drop the rest
            await conn.execute(f'DROP TABLE "{part.name}"')
        report = await run_checks(settings)
        assert report.check("partitions").status == "warn"
        # a row beyond every partition lands in the default one
        await conn.execute(
            "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) "
            "VALUES ('BTCUSDT', $1, $1)",
            int((time.time() + 30 * 86400) * 1e6),
        )
        report = await run_checks(settings)
        assert "orderbook_data_default" in report.check("partitions").detail
        for part in await _leaves_after(conn, time.time() - 86400):
            await conn.execute(f'DROP TABLE "{part}"')
        report = await run_checks(settings)
    finally:
        await conn.close()
    assert report.check("partitions").status == "fail"
    assert not report.ok


async def _leaves_after(conn: asyncpg.Connection, epoch_s: float) -> list[str]:
    """Range partitions whose end is after ``epoch_s``."""
    rows = await conn.fetch(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'orderbook_data'::regclass"
    )
    found = []
    for row in rows:
        match = re.search(r"TO \('?(\d+)'?\)", row["bound"])
        if match and int(match.group(1)) > epoch_s * 1e6:
            found.append(row["relname"])
    return found


async def test_a_database_never_migrated_fails(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    report = await run_checks(
        Settings(database_url=await asyncio.to_thread(make_database), spool_dir=tmp_path)
    )
    assert not report.ok
    assert report.check("migrations").status == "fail"
    assert report.check("migrations").value == "not migrated"
    assert report.check("table").status == "fail"


async def test_a_database_behind_head_fails(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    settings = Settings(database_url=await asyncio.to_thread(make_database), spool_dir=tmp_path)
    await asyncio.to_thread(migrations.upgrade, settings, "0001")
    report = await run_checks(settings)
    assert report.check("migrations").status == "fail"
    assert report.check("migrations").value == f"at 0001, head is {migrations.head_revision()}"


async def test_an_invalid_index_fails(make_database: Callable[[], str], tmp_path: Path) -> None:
    url = await asyncio.to_thread(make_database)
    settings = Settings(database_url=url, spool_dir=tmp_path)
    await asyncio.to_thread(migrations.upgrade, settings, "head")
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE probe (symbol text); INSERT INTO probe VALUES ('A'), ('A')"
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "CREATE UNIQUE INDEX CONCURRENTLY ix_symbol_unique ON probe (symbol)"
            )
    finally:
        await conn.close()
    report = await run_checks(settings)
    indexes = report.check("indexes")
    assert indexes.status == "fail"
    assert "ix_symbol_unique" in indexes.detail
    assert not report.ok


def _spool_batch(directory: Path, rows: int) -> None:
    quotes = [to_row(q) for q in QuoteWalk(["BTCUSDT"], seed=9).take(rows)]
    spool = Spool(directory)
    spool.open()
    spool.append(uuid.uuid4(), rows, encode_copy_text(quotes))
    spool.close()  # the writer "stopped": its lock is released, the rows stay


async def test_spool_backlog_of_a_stopped_writer_is_reported(
    settings: Settings, tmp_path: Path
) -> None:
    local = settings.model_copy(update={"spool_dir": tmp_path})
    _spool_batch(spool_directory(local), 37)
    _spool_batch(spool_directory(local), 5)
    report = await run_checks(local)
    spool = report.check("spool")
    assert spool.status == "warn"
    assert spool.value == "42 rows waiting"
    assert report.ok  # a backlog is a warning: the next writer replays it


async def test_spool_of_a_running_writer_is_reported(settings: Settings, tmp_path: Path) -> None:
    local = settings.model_copy(update={"spool_dir": tmp_path})
    spool = Spool(spool_directory(local))
    spool.open()
    try:
        rows = [to_row(q) for q in QuoteWalk(["ETHUSDT"], seed=4).take(8)]
        spool.append(uuid.uuid4(), 8, encode_copy_text(rows))
        report = await run_checks(local)
    finally:
        spool.close()
    assert report.check("spool").value == "8 rows spooled by running writers"


async def test_a_server_that_is_down_fails_and_still_reports_the_spool(tmp_path: Path) -> None:
    settings = Settings(
        host="127.0.0.1", port=free_port(), name="orderbook", sslmode="disable", spool_dir=tmp_path
    )
    report = await run_checks(settings)
    assert not report.ok
    assert report.check("connection").status == "fail"
    assert "cannot connect to PostgreSQL at 127.0.0.1" in report.check("connection").detail
    assert report.check("spool").status == "ok"


def test_cli_json_for_machines_and_exit_code(settings: Settings, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["doctor", "--json"], env=cli_env(settings, tmp_path))
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["ok"] is True
    assert {c["name"] for c in document["checks"]} == EXPECTED_CHECKS
    assert all(set(c) == {"name", "status", "value", "detail"} for c in document["checks"])


def test_cli_table_for_people(settings: Settings, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["doctor"], env=cli_env(settings, tmp_path))
    assert result.exit_code == 0, result.output
    assert "orderbook-store doctor" in result.output
    for name in ("migrations", "clock", "spool", "indexes"):
        assert name in result.output
    assert "all good" in result.output


def test_cli_exits_non_zero_when_something_is_wrong(tmp_path: Path) -> None:
    env = {
        "DB_HOST": "127.0.0.1",
        "DB_PORT": str(free_port()),
        "DB_SSLMODE": "disable",
        "DB_SPOOL_DIR": str(tmp_path),
    }
    result = CliRunner().invoke(cli_app, ["doctor", "--json"], env=env)
    assert result.exit_code == 1
    document = json.loads(result.output)
    assert document["ok"] is False
    assert document["checks"][0]["name"] == "connection"
    assert document["checks"][0]["status"] == "fail"


def test_roles_without_print_sql_does_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["roles"])
    assert result.exit_code == 2
    assert "--print-sql" in result.output


def test_run_from_synchronous_code(settings: Settings, tmp_path: Path) -> None:
    from orderbook_store.ops.doctor import run

    report = asyncio.run(
        asyncio.to_thread(run, settings.model_copy(update={"spool_dir": tmp_path}))
    )
    assert report.ok
