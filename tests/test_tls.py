"""TLS against a real server with a self-signed CA: every sslmode means what libpq says.

One server for the module (``ssl = on``, a CA made here, a certificate for ``localhost`` and
``127.0.0.1``). Its ``pg_hba.conf`` rejects unencrypted connections to the ``orderbook_tls``
database, so anything that works there (migrations, writer, reader) provably went through TLS;
``postgres`` accepts both, for the modes that may or may not encrypt.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from orderbook_store.engine import create_engine
from orderbook_store.errors import ConfigError, DatabaseUnavailable
from orderbook_store.ops import migrations
from orderbook_store.ops.doctor import run_checks
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk

from pgserver import TemporaryPostgres
from tls import ServerPki, TlsPostgres, write_server_pki

pytestmark = pytest.mark.fault

TLS_DB = "orderbook_tls"
SESSION_SSL = "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


class TlsServer:
    def __init__(self, server: TemporaryPostgres, pki: ServerPki) -> None:
        self.server = server
        self.pki = pki

    def settings(self, dbname: str = TLS_DB, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "host": "127.0.0.1",
            "port": self.server.port,
            "name": dbname,
            "user": "postgres",
            "password": None,
            "database_url": None,
            "pool_size": 2,
            "connect_timeout_s": 10,
            **overrides,
        }
        return Settings(**values)

    def reload(self, *statements: str) -> None:
        """Run ALTER SYSTEM statements (each on its own: they refuse a transaction), reload."""
        for sql in statements:
            self.server.psql(sql)
        self.server.psql("SELECT pg_reload_conf()")


@pytest.fixture(scope="module")
def tls_server() -> Iterator[TlsServer]:
    server = TlsPostgres()
    pki = write_server_pki(server.root / "pki", ["localhost", "127.0.0.1"])
    server.extra_conf.update(pki.server_conf())
    with server:
        hba = server.datadir / "pg_hba.conf"
        hba.write_text(
            f"hostnossl {TLS_DB} all 127.0.0.1/32 reject\n"
            "host all all 127.0.0.1/32 trust\n"
            "local all all trust\n"
        )
        server.psql("SELECT pg_reload_conf()")
        server.create_database(TLS_DB)
        tls = TlsServer(server, pki)
        migrations.upgrade(tls.settings(sslmode="verify-full", sslrootcert=pki.ca_file), "head")
        yield tls


async def session_ssl(settings: Settings) -> tuple[bool, str | None]:
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(text(SESSION_SSL))).one()
    finally:
        await engine.dispose()
    return bool(row.ssl), row.version


async def test_disable_connects_unencrypted(tls_server: TlsServer) -> None:
    assert await session_ssl(tls_server.settings("postgres", sslmode="disable")) == (False, None)


async def test_allow_tries_unencrypted_first(tls_server: TlsServer) -> None:
    encrypted, _ = await session_ssl(tls_server.settings("postgres", sslmode="allow"))
    assert not encrypted


async def test_prefer_encrypts_when_the_server_offers_tls(tls_server: TlsServer) -> None:
    encrypted, version = await session_ssl(tls_server.settings("postgres", sslmode="prefer"))
    assert encrypted
    assert version in ("TLSv1.2", "TLSv1.3")


async def test_require_encrypts_without_verifying_the_certificate(tls_server: TlsServer) -> None:
    # No CA given: the certificate from an unknown CA is accepted, the channel still encrypted.
    encrypted, _ = await session_ssl(tls_server.settings(sslmode="require"))
    assert encrypted


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
async def test_verify_modes_accept_the_right_ca(
    tls_server: TlsServer, mode: str, host: str
) -> None:
    settings = tls_server.settings(sslmode=mode, sslrootcert=tls_server.pki.ca_file, host=host)
    encrypted, _ = await session_ssl(settings)
    assert encrypted


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full", "require"])
async def test_a_wrong_ca_is_refused_with_a_clear_error(tls_server: TlsServer, mode: str) -> None:
    # ``require`` with a root certificate given verifies the chain, as libpq does.
    settings = tls_server.settings(sslmode=mode, sslrootcert=tls_server.pki.other_ca_file)
    with pytest.raises(DatabaseUnavailable) as caught:
        await session_ssl(settings)
    message = str(caught.value)
    assert f"127.0.0.1:{tls_server.server.port}" in message
    assert "certificate verify failed" in message
    assert "DB_SSLROOTCERT" in message


def test_verify_without_a_ca_file_is_a_config_error(
    tls_server: TlsServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql/root.crt to fall back on
    with pytest.raises(ConfigError, match="DB_SSLROOTCERT"):
        tls_server.settings(sslmode="verify-full").ssl_argument()
    with pytest.raises(ConfigError, match="no such file"):
        tls_server.settings(
            sslmode="verify-ca", sslrootcert=tmp_path / "missing.crt"
        ).ssl_argument()


@pytest.fixture
def cert_for_another_name(tls_server: TlsServer) -> Iterator[None]:
    """The server presents a certificate (from the right CA) for db.example.com only."""
    other_cert, other_key = tls_server.pki.issue(["db.example.com"], "other")
    tls_server.reload(
        f"ALTER SYSTEM SET ssl_cert_file = '{other_cert}'",
        f"ALTER SYSTEM SET ssl_key_file = '{other_key}'",
    )
    try:
        yield
    finally:
        tls_server.reload("ALTER SYSTEM RESET ssl_cert_file", "ALTER SYSTEM RESET ssl_key_file")


async def test_verify_full_refuses_a_certificate_for_another_host(
    tls_server: TlsServer, cert_for_another_name: None
) -> None:
    ca = tls_server.pki.ca_file
    # The chain is right, so verify-ca accepts it ...
    encrypted, _ = await session_ssl(tls_server.settings(sslmode="verify-ca", sslrootcert=ca))
    assert encrypted
    # ... but the name is not, and verify-full checks names.
    for host in ("127.0.0.1", "localhost"):
        settings = tls_server.settings(sslmode="verify-full", sslrootcert=ca, host=host)
        with pytest.raises(DatabaseUnavailable) as caught:
            await session_ssl(settings)
        assert "certificate verify failed" in str(caught.value)
        assert "mismatch" in str(caught.value).lower()


@pytest.fixture
def tls_turned_off(tls_server: TlsServer) -> Iterator[None]:
    tls_server.reload("ALTER SYSTEM SET ssl = off")
    try:
        yield
    finally:
        tls_server.reload("ALTER SYSTEM RESET ssl")


async def test_require_fails_against_a_server_without_tls(
    tls_server: TlsServer, tls_turned_off: None
) -> None:
    with pytest.raises(DatabaseUnavailable, match="sslmode require"):
        await session_ssl(tls_server.settings("postgres", sslmode="require"))
    # prefer falls back to an unencrypted session, as libpq does
    assert await session_ssl(tls_server.settings("postgres", sslmode="prefer")) == (False, None)


async def test_migrations_went_through_tls(tls_server: TlsServer) -> None:
    # The fixture migrated orderbook_tls with verify-full; unencrypted sessions are refused there.
    with pytest.raises(DatabaseUnavailable, match=r"no encryption|pg_hba\.conf"):
        await session_ssl(tls_server.settings(sslmode="disable"))
    engine = create_engine(
        tls_server.settings(sslmode="verify-full", sslrootcert=tls_server.pki.ca_file)
    )
    try:
        async with engine.connect() as conn:
            current = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    finally:
        await engine.dispose()
    assert current == migrations.head_revision()


async def test_writer_and_reader_go_through_tls(tls_server: TlsServer, tmp_path: Path) -> None:
    settings = tls_server.settings(
        sslmode="verify-full",
        sslrootcert=tls_server.pki.ca_file,
        application_name="obs_tls_test",
        spool_dir=tmp_path,
    )
    quotes = QuoteWalk(["BTCUSDT"], seed=7).take(500)
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine) as repo:
            for quote in quotes:
                await repo.add(quote)
            await repo.flush(timeout_s=60)
            frame = await repo.quotes(
                "BTCUSDT", quotes[0]["timestamp"], quotes[-1]["timestamp"] + 1
            )
            assert len(frame) == 500
            assert repo.stats().rows_written == 500
            async with engine.connect() as conn:
                sessions = (
                    await conn.execute(
                        text(
                            "SELECT count(*) AS n, bool_and(s.ssl) AS all_ssl "
                            "FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
                            "WHERE a.application_name = 'obs_tls_test'"
                        )
                    )
                ).one()
            assert sessions.n >= 1
            assert sessions.all_ssl is True
    finally:
        await engine.dispose()


async def test_doctor_reports_the_tls_version(tls_server: TlsServer, tmp_path: Path) -> None:
    settings = tls_server.settings(
        sslmode="verify-full", sslrootcert=tls_server.pki.ca_file, spool_dir=tmp_path
    )
    report = await run_checks(settings)
    tls = report.check("tls")
    assert tls.status == "ok"
    assert tls.value.startswith("TLSv1.")
    assert "verify-full" in tls.detail


async def test_allow_upgrades_to_tls_when_the_server_insists(tls_server: TlsServer) -> None:
    # orderbook_tls rejects unencrypted sessions: libpq's allow then retries with TLS.
    encrypted, _ = await session_ssl(tls_server.settings(sslmode="allow"))
    assert encrypted
