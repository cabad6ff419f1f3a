"""The package through a real PgBouncer in transaction mode, as DigitalOcean's pools run it.

PgBouncer (Debian package ``pgbouncer``) is started here in front of a private server, on a
free loopback port, as an unprivileged user (it refuses to run as root). Its settings follow
DigitalOcean's pools: ``pool_mode = transaction``, only ``extra_float_digits`` ignored among
unknown startup parameters. Without PgBouncer installed these tests fail and say how to
install it: they must not pass by not running.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from orderbook_store.engine import create_engine
from orderbook_store.errors import DatabaseUnavailable
from orderbook_store.ops import migrations
from orderbook_store.ops.doctor import run_checks
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk

from pgserver import SYSTEM_USER, CommandFailed, TemporaryPostgres, free_port
from tls import ServerPki, write_server_pki

pytestmark = pytest.mark.fault

DB = "orderbook"
INSTALL_HINT = "install it with `apt-get install -y pgbouncer` (or `make system-deps`)"


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
    )
    if found is None:
        pytest.fail(f"PgBouncer is not installed: {INSTALL_HINT}", pytrace=False)
    return found


class PgBouncer:
    """``pgbouncer`` in transaction mode in front of ``server``; stopped on exit."""

    def __init__(
        self,
        server: TemporaryPostgres,
        *,
        pool_size: int = 2,
        ignore_startup_parameters: str = "extra_float_digits",
        client_tls: ServerPki | None = None,
    ) -> None:
        self.ignore_startup_parameters = ignore_startup_parameters
        self.client_tls = client_tls
        self.binary = pgbouncer_binary()
        self.server = server
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="obs-pgbouncer-"))
        self.pool_size = pool_size
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PgBouncer:
        os.chmod(self.root, 0o777)
        (self.root / "userlist.txt").write_text('"postgres" ""\n')
        try:
            for _attempt in range(5):
                if self._start():
                    return self
                # The port was taken between free_port() and PgBouncer's bind: another.
                self.port = free_port()
            raise RuntimeError(f"pgbouncer found no free port: {self.log()}")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _start(self) -> bool:
        """Start PgBouncer on ``self.port``; False if that port turned out to be taken."""
        tls = ""
        if self.client_tls is not None:  # clients must use TLS, as on DigitalOcean's pools
            tls = (
                "client_tls_sslmode = require\n"
                f"client_tls_cert_file = {self.client_tls.cert_file}\n"
                f"client_tls_key_file = {self.client_tls.key_file}\n"
            )
        ini = self.root / "pgbouncer.ini"
        ini.write_text(
            f"""\
[databases]
* = host=127.0.0.1 port={self.server.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.root}/userlist.txt
admin_users = postgres
pool_mode = transaction
default_pool_size = {self.pool_size}
max_client_conn = 200
ignore_startup_parameters = {self.ignore_startup_parameters}
logfile = {self.root}/pgbouncer.log
{tls}"""
        )
        (self.root / "pgbouncer.log").unlink(missing_ok=True)
        run_as: dict[str, object] = {"user": SYSTEM_USER} if os.geteuid() == 0 else {}
        # In the foreground PgBouncer logs to stderr as well as to its logfile: a file, never a
        # pipe nobody reads (a full pipe would stop PgBouncer in the middle of a test).
        with open(self.root / "stderr.log", "wb") as stderr:
            self.process = subprocess.Popen(
                [self.binary, str(ini)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                **run_as,  # type: ignore[arg-type]
            )
        return self._wait_listening()

    def _wait_listening(self) -> bool:
        """Wait for PgBouncer's own word that it listens (a successful connect alone could
        reach another listener that took the port, while PgBouncer exits for lack of it)."""
        listening = f"listening on 127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process is not None
            log = self.log()
            if self.process.poll() is not None:
                if "Address already in use" in log:
                    return False
                raise RuntimeError(f"pgbouncer exited: {self.stderr() or log}")
            if listening in log and "process up" in log:
                return True
            time.sleep(0.02)
        raise RuntimeError(f"pgbouncer did not listen within 30 s: {self.log()}")

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "pgbouncer.log"
        return path.read_text() if path.exists() else ""

    def stderr(self) -> str:
        path = self.root / "stderr.log"
        return path.read_text() if path.exists() else ""

    def admin(self, command: str) -> str:
        """A command on PgBouncer's admin console (``SHOW POOLS``...), through psql; a failure
        shows psql's message, whether PgBouncer still runs, and the end of its log."""
        try:
            return self.server.psql(command, "pgbouncer", port=self.port)
        except CommandFailed as failed:
            assert self.process is not None
            state = "running" if self.process.poll() is None else f"exited {self.process.poll()}"
            log_tail = "\n".join(self.log().splitlines()[-40:])
            raise AssertionError(
                f"{failed}\n--- pgbouncer on port {self.port} ({state}), end of its log ---\n"
                f"{log_tail}"
            ) from failed

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "host": "127.0.0.1",
            "port": self.port,
            "name": DB,
            "user": "postgres",
            "password": None,
            "database_url": None,
            "sslmode": "disable",
            "pool_size": 3,
            **overrides,
        }
        return Settings(**values)


@pytest.fixture(scope="module")
def bouncer() -> Iterator[PgBouncer]:
    with TemporaryPostgres() as server:
        server.create_database(DB)
        with PgBouncer(server) as running:
            yield running


async def test_migrations_writer_and_reader_work_through_pgbouncer(
    bouncer: PgBouncer, tmp_path: Path
) -> None:
    settings = bouncer.settings(pgbouncer=True, spool_dir=tmp_path, batch_size=200)
    assert settings.behind_pgbouncer
    migrations.upgrade(settings, "head")

    quotes = QuoteWalk(["BTCUSDT", "ETHUSDT"], seed=21).take(3000)
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine) as repo:
            for quote in quotes[:2000]:
                await repo.add(quote)  # group-committed COPY + ledger, many transactions
            await repo.flush(timeout_s=60)
            assert repo.stats().rows_written == 2000
            assert await repo.insert_many(quotes[2000:]) == 1000  # one streamed COPY

            btc = [q for q in quotes if q["symbol"] == "BTCUSDT"]
            # Several reads at once: more clients than server connections in the pool.
            frames = await asyncio.gather(
                *(
                    repo.quotes("BTCUSDT", btc[0]["timestamp"], btc[-1]["timestamp"] + 1)
                    for _ in range(6)
                )
            )
            assert all(len(frame) == len(btc) for frame in frames)
            chunks = [
                chunk
                async for chunk in repo.iter_quotes(
                    "BTCUSDT", btc[0]["timestamp"], btc[-1]["timestamp"] + 1, chunk_rows=500
                )
            ]
            assert sum(len(c) for c in chunks) == len(btc)
            assert await repo.count() == 3000
    finally:
        await engine.dispose()

    pools = bouncer.admin("SHOW POOLS")
    assert any(line.startswith(f"{DB}|postgres|") for line in pools.splitlines()), pools
    config = bouncer.admin("SHOW CONFIG")
    assert any(line.startswith("pool_mode|transaction|") for line in config.splitlines())


def test_a_port_taken_by_another_listener_is_not_mistaken_for_pgbouncer(
    bouncer: PgBouncer,
) -> None:
    """The harness itself: a port that another process grabbed between free_port() and
    PgBouncer's bind is noticed (PgBouncer exits), and PgBouncer starts on another one."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        pool = PgBouncer(bouncer.server)
        pool.port = taken
        with pool:
            assert pool.port != taken
            assert pool.process is not None and pool.process.poll() is None
            assert pool.admin("SHOW VERSION").startswith("PgBouncer")


def test_port_25061_means_pgbouncer() -> None:
    assert Settings(port=25061, pgbouncer=None).behind_pgbouncer
    assert not Settings(port=25060, pgbouncer=None).behind_pgbouncer
    assert Settings(port=6432, pgbouncer=True).behind_pgbouncer


async def _alternate_queries(settings: Settings, rounds: int) -> None:
    """Two clients taking turns on PgBouncer's shared server connections."""
    engines = [create_engine(settings) for _ in range(2)]
    try:
        for i in range(rounds):
            for n, engine in enumerate(engines):
                async with engine.connect() as conn:
                    await conn.execute(
                        text("SELECT count(*) FROM orderbook_data WHERE symbol = :s"),
                        {"s": f"S{i}_{n}"},
                    )
    finally:
        for engine in engines:
            await engine.dispose()


async def test_without_pgbouncer_mode_connections_are_refused(bouncer: PgBouncer) -> None:
    """Like DigitalOcean's pools, PgBouncer refuses the session timeouts as startup parameters."""
    with pytest.raises(DatabaseUnavailable, match="unsupported startup parameter"):
        await _alternate_queries(bouncer.settings(pgbouncer=False), rounds=1)


async def _statement_on_another_server_connection(settings: Settings) -> None:
    """Client B prepares a statement on one server connection, then runs it again when
    PgBouncer (LIFO) hands it the other one."""
    query = text("SELECT count(*) FROM orderbook_data WHERE symbol = :s")
    a, b = create_engine(settings), create_engine(settings)
    try:
        async with a.connect() as conn_a:
            await conn_a.execute(query, {"s": "A"})  # A holds server connection 1
            async with b.connect() as conn_b:
                await conn_b.execute(query, {"s": "B"})  # B prepares on server connection 2
                await conn_b.commit()  # ... which goes back to the pool
            await conn_a.commit()  # connection 1 back to the pool, most recently
        async with b.connect() as conn_b:
            await conn_b.execute(query, {"s": "B"})  # B's statement, on connection 1
    finally:
        await a.dispose()
        await b.dispose()


async def test_without_pgbouncer_mode_prepared_statements_break(bouncer: PgBouncer) -> None:
    """The other failure the setting exists for is real too: a client's named prepared
    statement is looked for on a server connection it was not prepared on. Shown on a
    PgBouncer that ignores the timeouts, so connecting succeeds."""
    migrations.upgrade(bouncer.settings(pgbouncer=True), "head")
    lenient = PgBouncer(
        bouncer.server,
        pool_size=2,
        ignore_startup_parameters=(
            "extra_float_digits,idle_in_transaction_session_timeout,statement_timeout"
        ),
    )
    with lenient:
        with pytest.raises((DBAPIError, asyncpg.PostgresError)) as caught:
            await _statement_on_another_server_connection(lenient.settings(pgbouncer=False))
        assert "prepared statement" in str(caught.value)
        assert "does not exist" in str(caught.value)
        # The same traffic in PgBouncer mode is fine.
        await _statement_on_another_server_connection(lenient.settings(pgbouncer=True))


async def test_verified_tls_to_the_pool_port(bouncer: PgBouncer, tmp_path: Path) -> None:
    """DigitalOcean's pools speak TLS: verify-full to a PgBouncer that requires it, port
    25061's setting turned on by DB_PGBOUNCER; the writer, the reader and doctor all work."""
    migrations.upgrade(bouncer.settings(pgbouncer=True), "head")
    # where the pool's unprivileged user can read it (pytest's tmp_path is private to root)
    pki = write_server_pki(bouncer.server.root / "pool-pki", ["localhost", "127.0.0.1"])
    with PgBouncer(bouncer.server, client_tls=pki) as pool:
        with pytest.raises(DatabaseUnavailable):  # the pool refuses clients without TLS
            await _alternate_queries(pool.settings(pgbouncer=True), rounds=1)
        settings = pool.settings(
            pgbouncer=True,
            sslmode="verify-full",
            sslrootcert=pki.ca_file,
            host="localhost",
            spool_dir=tmp_path / "spool",
        )
        quotes = QuoteWalk(["XRPUSDT"], seed=31).take(200)
        engine = create_engine(settings)
        try:
            async with OrderbookRepository(engine) as repo:
                await repo.add_many(quotes)
                await repo.flush(timeout_s=60)
                frame = await repo.quotes("XRPUSDT", quotes[0]["timestamp"], 2**62)
                assert len(frame) == 200
        finally:
            await engine.dispose()
        report = await run_checks(settings)
    tls = report.check("tls")
    assert tls.status == "ok"
    assert tls.value.startswith("TLSv1.")
    assert "host name verified" in tls.detail
