"""Hostile input, secrets and hung servers, against a real password-protected server.

* Hostile strings (quotes, semicolons, backslashes, COPY's own markers, NUL, very long) as
  symbol, exchange and file name: stored literally or refused with a clear error, never SQL.
* The password (a scram-sha-256 login) never appears in logs at DEBUG, exceptions with their
  whole chain, doctor's output or a CLI process's output, for a failing connection and a
  failing migration.
* Timeouts reach the session; a hung server (its processes stopped with SIGSTOP) never hangs
  the caller: connecting fails within the connect timeout, and the writer spools.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import psutil
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from orderbook_store.engine import create_engine
from orderbook_store.errors import DatabaseUnavailable, InvalidQuote, OrderbookStoreError
from orderbook_store.files.importers.pipeline import import_paths
from orderbook_store.ops import migrations
from orderbook_store.ops.doctor import run_checks
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk

from pgserver import TemporaryPostgres

pytestmark = pytest.mark.fault

APP_USER = "obs_app"
PASSWORD = "Pw-" + secrets.token_hex(12) + "-SECRET"
WRONG_PASSWORD = "Wrong-" + secrets.token_hex(12) + "-SECRET"
DB = "orderbook"
ROOT = Path(__file__).resolve().parent.parent


class SecureServer:
    def __init__(self, server: TemporaryPostgres) -> None:
        self.server = server

    def settings(self, password: str = PASSWORD, dbname: str = DB, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "host": "127.0.0.1",
            "port": self.server.port,
            "name": dbname,
            "user": APP_USER,
            "password": password,
            "database_url": None,
            "sslmode": "disable",
            "pool_size": 2,
            "connect_timeout_s": 5,
            **overrides,
        }
        return Settings(**values)

    def env(self, password: str = PASSWORD, dbname: str = DB) -> dict[str, str]:
        """Environment for a CLI process: everything through DB_* variables."""
        keep = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
        keep.pop("DATABASE_URL", None)
        return {
            **keep,
            "DB_HOST": "127.0.0.1",
            "DB_PORT": str(self.server.port),
            "DB_NAME": dbname,
            "DB_USER": APP_USER,
            "DB_PASSWORD": password,
            "DB_SSLMODE": "disable",
        }


@pytest.fixture(scope="module")
def secure() -> Iterator[SecureServer]:
    with TemporaryPostgres() as server:
        (server.datadir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        server.psql("SELECT pg_reload_conf()")
        server.psql(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{PASSWORD}'")
        server.psql(f"CREATE DATABASE {DB} OWNER {APP_USER}")
        secure = SecureServer(server)
        migrations.upgrade(secure.settings(), "head")
        yield secure


@pytest.fixture
async def repo(secure: SecureServer, tmp_path: Path) -> Iterator[OrderbookRepository]:
    engine = create_engine(secure.settings(spool_dir=tmp_path))
    async with engine.begin() as conn:
        await conn.execute(
            text("TRUNCATE orderbook_data, orderbook_write_batches, orderbook_import_files")
        )
    async with OrderbookRepository(engine) as repository:
        yield repository  # type: ignore[misc]
    await engine.dispose()


# -- hostile strings ----------------------------------------------------------------------

HOSTILE = [
    "'; DROP TABLE orderbook_data; --",
    'a"b',
    "semi;colon",
    "back\\slash",
    "\\.",  # COPY text's end-of-data marker
    "\\N",  # COPY text's NULL
    "tab\there",
    "new\nline",
    "cr\rhere",
    "%s%(x)s{0}",
    "$1::text",
    "ünï©ødé",
]
REFUSED = ["nul\x00byte", "x" * 21, "y" * 100_000, ""]


def _quote(symbol: str = "BTCUSDT", exchange: str | None = None) -> dict[str, object]:
    quote = QuoteWalk(["BTCUSDT"], seed=1).take(1)[0]
    quote["symbol"] = symbol
    if exchange is not None:
        quote["exchange"] = exchange
    return quote


async def _table_intact(secure: SecureServer) -> None:
    conn = await asyncpg.connect(secure.server.url(DB))
    try:
        assert await conn.fetchval("SELECT to_regclass('orderbook_data') IS NOT NULL")
    finally:
        await conn.close()


@pytest.mark.parametrize("symbol", HOSTILE)
async def test_hostile_symbol_is_stored_literally(
    repo: OrderbookRepository, secure: SecureServer, symbol: str
) -> None:
    quote = _quote(symbol)
    try:
        assert await repo.insert_many([quote]) == 1
    except InvalidQuote as exc:  # refused by validation: fine, if it says which field
        assert exc.field == "symbol"
        return
    await repo.add(_quote(symbol))  # the buffered path too
    await repo.flush(timeout_s=30)
    assert await repo.count(symbol) == 2
    frame = await repo.quotes(symbol, 0, 2**62)
    assert list(frame["symbol"]) == [symbol, symbol]
    await _table_intact(secure)


@pytest.mark.parametrize("exchange", [*HOSTILE, "e" * 50])
async def test_hostile_exchange_is_stored_literally(
    repo: OrderbookRepository, secure: SecureServer, exchange: str
) -> None:
    try:
        assert await repo.insert_many([_quote("BTCUSDT", exchange)]) == 1
    except InvalidQuote as exc:
        assert exc.field == "exchange"
        return
    frame = await repo.quotes("BTCUSDT", 0, 2**62, exchange=exchange)
    assert list(frame["exchange"]) == [exchange]
    await _table_intact(secure)


@pytest.mark.parametrize("symbol", REFUSED)
async def test_unstorable_symbols_are_refused_clearly(
    repo: OrderbookRepository, secure: SecureServer, symbol: str
) -> None:
    with pytest.raises(InvalidQuote) as caught:
        await repo.insert_many([_quote(symbol)])
    assert caught.value.field == "symbol"
    assert len(str(caught.value)) < 300  # a very long value is cut in the message
    with pytest.raises(InvalidQuote):
        await repo.add(_quote(symbol))
    assert await repo.count() == 0
    await _table_intact(secure)


@pytest.mark.parametrize("exchange", ["nul\x00byte", "e" * 51, "z" * 100_000])
async def test_unstorable_exchanges_are_refused_clearly(
    repo: OrderbookRepository, exchange: str
) -> None:
    with pytest.raises(InvalidQuote) as caught:
        await repo.insert_many([_quote("BTCUSDT", exchange)])
    assert caught.value.field == "exchange"


@pytest.mark.parametrize("symbol", [*HOSTILE, *REFUSED])
async def test_hostile_symbols_in_reads_match_nothing_or_are_refused(
    repo: OrderbookRepository, secure: SecureServer, symbol: str
) -> None:
    await repo.insert_many([_quote("BTCUSDT")])
    for read in (
        lambda: repo.quotes(symbol, 0, 2**62),
        lambda: repo.latest(symbol),
        lambda: repo.asof(symbol, 2**61),
    ):
        try:
            frame = await read()
        except (OrderbookStoreError, ValueError) as exc:
            assert str(exc)
        else:
            assert len(frame) == 0 or frame["symbol"].isna().all()
    assert await repo.count() == 1
    await _table_intact(secure)


async def test_hostile_file_names_are_imported_and_recorded_literally(
    repo: OrderbookRepository, secure: SecureServer, tmp_path: Path, real_quotes_path: Path
) -> None:
    name = 'x\'; DROP TABLE orderbook_data;-- \\ "q" ü.csv.gz'
    hostile = tmp_path / name
    with gzip.open(real_quotes_path, "rb") as src:
        lines = src.read().splitlines(keepends=True)[:101]  # header + 100 quotes
    with gzip.open(hostile, "wb") as out:
        out.writelines(lines)
    summary = await import_paths(repo.engine, [hostile], quarantine=tmp_path / "q.csv")
    assert summary.files[0].rows == 100, summary
    conn = await asyncpg.connect(secure.server.url(DB))
    try:
        recorded = await conn.fetchval("SELECT path FROM orderbook_import_files")
    finally:
        await conn.close()
    assert recorded.endswith(name)
    assert await repo.count() == 100
    await _table_intact(secure)


# -- the password never shows ----------------------------------------------------------------


def _no_secret(*texts: str) -> None:
    for captured in texts:
        assert PASSWORD not in captured
        assert WRONG_PASSWORD not in captured


def _whole_chain(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


async def test_a_failing_connection_never_shows_the_password(
    secure: SecureServer, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = secure.settings(password=WRONG_PASSWORD)
    _no_secret(repr(settings), str(settings), str(settings.sqlalchemy_url()))
    with caplog.at_level(logging.DEBUG):
        engine = create_engine(settings)
        try:
            with pytest.raises(DatabaseUnavailable) as caught:
                async with engine.connect():
                    pass
        finally:
            await engine.dispose()
    assert "password authentication failed" in str(caught.value)
    out = capsys.readouterr()
    _no_secret(_whole_chain(caught.value), caplog.text, out.out, out.err, repr(engine.url))


async def test_a_failing_migration_never_shows_the_password(
    secure: SecureServer, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    secure.server.psql(f"CREATE DATABASE broken OWNER {APP_USER}")
    # An object in the way of revision 0003: the upgrade fails half way, on the server.
    secure.server.psql("CREATE TABLE orderbook_import_files (x int)", dbname="broken")
    secure.server.psql(f"ALTER TABLE orderbook_import_files OWNER TO {APP_USER}", dbname="broken")
    settings = secure.settings(dbname="broken")
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("sqlalchemy.engine").setLevel(logging.DEBUG)
        try:
            with pytest.raises(DBAPIError) as caught:
                await asyncio.to_thread(migrations.upgrade, settings, "head")
        finally:
            logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    assert "already exists" in str(caught.value)
    assert "orderbook_import_files" in caplog.text  # the DEBUG log did record the statements
    out = capsys.readouterr()
    _no_secret(_whole_chain(caught.value), caplog.text, out.out, out.err)


async def test_doctor_never_shows_the_password(
    secure: SecureServer, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    with caplog.at_level(logging.DEBUG):
        good = await run_checks(secure.settings(spool_dir=tmp_path))
        bad = await run_checks(secure.settings(password=WRONG_PASSWORD, spool_dir=tmp_path))
    assert good.ok, good.as_dict()
    assert not bad.ok
    assert "password authentication failed" in bad.check("connection").detail
    _no_secret(str(good.as_dict()), str(bad.as_dict()), caplog.text)


DEBUG_MAIN = (
    "import logging, sys; logging.basicConfig(level=logging.DEBUG); "
    "from {module} import main; sys.argv[0] = 'orderbook-store'; main()"
)


def _cli(module: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", DEBUG_MAIN.format(module=module), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@pytest.mark.parametrize("password", [PASSWORD, WRONG_PASSWORD])
def test_doctor_process_output_never_shows_the_password(
    secure: SecureServer, password: str, tmp_path: Path
) -> None:
    env = {**secure.env(password), "DB_SPOOL_DIR": str(tmp_path)}
    for args in (["doctor"], ["doctor", "--json"]):
        result = _cli("orderbook_store.cli", args, env)
        assert result.returncode == (0 if password == PASSWORD else 1), result.stderr
        assert "connection" in result.stdout
        _no_secret(result.stdout, result.stderr)


@pytest.mark.parametrize("password", [PASSWORD, WRONG_PASSWORD])
def test_upgrade_process_output_never_shows_the_password(
    secure: SecureServer, password: str
) -> None:
    dbname = "broken_cli_" + ("right" if password == PASSWORD else "wrong")
    secure.server.psql(f"CREATE DATABASE {dbname} OWNER {APP_USER}")
    secure.server.psql("CREATE TABLE orderbook_import_files (x int)", dbname=dbname)
    secure.server.psql(f"ALTER TABLE orderbook_import_files OWNER TO {APP_USER}", dbname=dbname)
    result = _cli("orderbook_store.cli", ["upgrade", "head"], secure.env(password, dbname))
    assert result.returncode != 0
    expected = "already exists" if password == PASSWORD else "password authentication failed"
    assert expected in result.stdout + result.stderr
    _no_secret(result.stdout, result.stderr)


# -- passwords with reserved characters, in every form libpq knows ------------------------

RESERVED = ["/", "#", "?", "@", "%", ":", "[", "]"]


def _clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DB_", "PG")) and k != "DATABASE_URL"
    }


async def _logged_in_as(settings: Settings) -> str:
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            return str((await conn.execute(text("SELECT current_user"))).scalar())
    finally:
        await engine.dispose()


@pytest.mark.parametrize("char", RESERVED, ids=[f"x{ord(c):02x}" for c in RESERVED])
async def test_a_password_with_a_reserved_character_logs_in_in_every_form(
    secure: SecureServer, char: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    role = f"obs_reserved_{ord(char):02x}"
    password = f"Pw{char}{secrets.token_hex(6)}{char}end"
    wrong = f"Wrong{char}{secrets.token_hex(6)}{char}end"
    secure.server.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE {APP_USER}")
    for name in [k for k in os.environ if k.startswith(("DB_", "PG")) or k == "DATABASE_URL"]:
        monkeypatch.delenv(name)
    where = f"127.0.0.1:{secure.server.port}/{DB}"

    def forms(secret: str) -> dict[str, str]:
        encoded = quote(secret, safe="")
        return {
            "user:password@": f"postgresql://{role}:{encoded}@{where}?sslmode=disable",
            "?password=": f"postgresql://{where}?sslmode=disable&user={role}&password={encoded}",
        }

    for form, url in forms(password).items():
        assert await _logged_in_as(Settings(database_url=url, pool_size=1)) == role, form
    bare = f"postgresql://{role}@{where}?sslmode=disable"
    monkeypatch.setenv("PGPASSWORD", password)
    assert await _logged_in_as(Settings(database_url=bare, pool_size=1)) == role
    monkeypatch.setenv("PGPASSWORD", wrong)
    monkeypatch.setenv("DB_PASSWORD", password)  # DB_PASSWORD beats PGPASSWORD
    assert await _logged_in_as(Settings(database_url=bare, pool_size=1)) == role
    monkeypatch.delenv("DB_PASSWORD")
    monkeypatch.delenv("PGPASSWORD")

    # The command line: the right password logs in, a wrong one is named as such; neither
    # password appears in anything it prints, even with DEBUG logging on.
    env = {**_clean_env(), "DB_SPOOL_DIR": str(tmp_path)}
    for form, url in forms(password).items():
        result = _cli("orderbook_store.cli", ["doctor", "--json"], {**env, "DATABASE_URL": url})
        assert json.loads(result.stdout)["checks"][0]["status"] == "ok", (form, result.stdout)
        assert password not in result.stdout + result.stderr
    for form, url in forms(wrong).items():
        result = _cli("orderbook_store.cli", ["upgrade"], {**env, "DATABASE_URL": url})
        assert result.returncode == 1, form
        assert "password authentication failed" in result.stderr, (form, result.stderr)
        assert wrong not in result.stdout + result.stderr
        assert quote(wrong, safe="") not in result.stdout + result.stderr


# -- timeouts and a hung server -------------------------------------------------------------


async def test_session_timeouts_reach_the_server(secure: SecureServer) -> None:
    settings = secure.settings(
        statement_timeout_ms=300, idle_in_transaction_session_timeout_ms=7000
    )
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SHOW statement_timeout"))).scalar() == "300ms"
            assert (
                await conn.execute(text("SHOW idle_in_transaction_session_timeout"))
            ).scalar() == "7s"
        async with engine.connect() as conn:
            with pytest.raises(DBAPIError, match="statement timeout"):
                await conn.execute(text("SELECT pg_sleep(30)"))
    finally:
        await engine.dispose()


async def test_an_idle_transaction_is_ended_by_the_server(secure: SecureServer) -> None:
    engine = create_engine(secure.settings(idle_in_transaction_session_timeout_ms=200))
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))  # a transaction is open now
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            for _ in range(200):  # the server closes the session; wait for it to notice
                if raw.is_closed():
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(DBAPIError):
                await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()


def _server_processes(server: TemporaryPostgres) -> list[psutil.Process]:
    postmaster = int((server.datadir / "postmaster.pid").read_text().splitlines()[0])
    parent = psutil.Process(postmaster)
    return [parent, *parent.children(recursive=True)]


def _signal_all(processes: list[psutil.Process], signum: signal.Signals) -> None:
    """Signal each process; one that exited since it was listed (a backend or worker ending on
    its own) needs no signal."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


@pytest.fixture
def hung(secure: SecureServer) -> Iterator[None]:
    """Every process of the server stopped (SIGSTOP): it accepts TCP, then never answers."""
    processes = _server_processes(secure.server)
    _signal_all(processes, signal.SIGSTOP)
    try:
        yield
    finally:
        _signal_all(processes, signal.SIGCONT)


async def test_a_hung_server_fails_the_connect_within_its_timeout(
    secure: SecureServer, hung: None
) -> None:
    engine = create_engine(secure.settings(connect_timeout_s=1))
    try:
        # The guard is ten times the connect timeout: the point is that it never hangs.
        with pytest.raises(DatabaseUnavailable, match=r"no answer within 1 s \(connect timeout\)"):
            await asyncio.wait_for(_select_one(engine), timeout=10)
    finally:
        await engine.dispose()


async def _select_one(engine: object) -> None:
    async with engine.connect() as conn:  # type: ignore[attr-defined]
        await conn.execute(text("SELECT 1"))


async def test_the_writer_spools_while_the_server_hangs(
    secure: SecureServer, tmp_path: Path
) -> None:
    secure.server.psql("TRUNCATE orderbook_data, orderbook_write_batches", dbname=DB)
    quotes = QuoteWalk(["BTCUSDT"], seed=17).take(300)
    spool_dir = tmp_path / "spool"
    settings = secure.settings(connect_timeout_s=1, spool_dir=spool_dir, flush_interval_s=0.05)
    processes = _server_processes(secure.server)
    _signal_all(processes, signal.SIGSTOP)
    try:
        engine = create_engine(settings)
        try:
            repo = OrderbookRepository(engine)
            for quote in quotes:  # add() never waits for the database
                await asyncio.wait_for(repo.add(quote), timeout=5)
            with pytest.raises(DatabaseUnavailable):
                await asyncio.wait_for(repo.flush(timeout_s=2), timeout=30)
            await asyncio.wait_for(repo.close(timeout_s=2), timeout=30)
            stats = repo.stats()
            assert stats.rows_written == 0
            assert stats.rows_in_spool == 300
        finally:
            await engine.dispose()
    finally:
        _signal_all(processes, signal.SIGCONT)
    # The server is back: the next writer on this host replays the spool.
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine) as repo:
            await repo.flush(timeout_s=60)
            assert await repo.count() == 300
    finally:
        await engine.dispose()
