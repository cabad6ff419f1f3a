"""Settings come from env, .env, the old collector's JSON, or a libpq URL; secrets stay hidden."""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from orderbook_store.engine import create_engine
from orderbook_store.errors import ConfigError, DatabaseUnavailable
from orderbook_store.settings import Settings

SECRET = "s3cr3t-Pa55word!"
DO_URL = (
    f"postgresql://doadmin:{SECRET}@db-pg-1.b.db.ondigitalocean.com:25060/defaultdb?sslmode=require"
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No DB_* variables or .env from the developer's shell leak into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("DB_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_production_defaults_match_the_original_plan() -> None:
    s = Settings()
    assert (s.port, s.sslmode, s.pool_size, s.batch_size) == (25060, "require", 10, 50)


def test_every_db_variable_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "DB_HOST": "db.example.com",
        "DB_PORT": "5433",
        "DB_NAME": "quotes",
        "DB_USER": "collector",
        "DB_PASSWORD": SECRET,
        "DB_SSLMODE": "verify-full",
        "DB_SSLROOTCERT": "/etc/ca-certificate.crt",
        "DB_POOL_SIZE": "4",
        "DB_BATCH_SIZE": "500",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert (s.host, s.port, s.name, s.user) == ("db.example.com", 5433, "quotes", "collector")
    assert s.password is not None and s.password.get_secret_value() == SECRET
    assert (s.sslmode, s.sslrootcert) == ("verify-full", Path("/etc/ca-certificate.crt"))
    assert (s.pool_size, s.batch_size) == (4, 500)


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"DB_HOST=from-dotenv\nDB_PASSWORD={SECRET}\nDB_PORT=6543\n")
    s = Settings()
    assert (s.host, s.port) == ("from-dotenv", 6543)


def test_database_url_as_digitalocean_hands_it_out() -> None:
    s = Settings(database_url=DO_URL)
    assert (s.host, s.port, s.name, s.user) == (
        "db-pg-1.b.db.ondigitalocean.com",
        25060,
        "defaultdb",
        "doadmin",
    )
    assert s.sslmode == "require"
    assert s.password is not None and s.password.get_secret_value() == SECRET


def test_db_variable_beside_database_url_overrides_that_part(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", DO_URL + "&application_name=collector-7&connect_timeout=3")
    monkeypatch.setenv("DB_PORT", "25061")
    monkeypatch.setenv("DB_SSLMODE", "verify-full")
    s = Settings()
    assert (s.port, s.sslmode, s.host) == (25061, "verify-full", "db-pg-1.b.db.ondigitalocean.com")
    assert (s.application_name, s.connect_timeout_s) == ("collector-7", 3.0)


def test_url_without_sslmode_or_port_keeps_libpq_defaults() -> None:
    s = Settings(database_url="postgresql://u@h/d")
    assert (s.sslmode, s.port) == ("prefer", 5432)


def test_collector_json_config_with_password_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DB_PASSWORD", SECRET)
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "storage": {"type": "postgresql"},
                "postgresql": {
                    "host": "db-pg-1.b.db.ondigitalocean.com",
                    "port": 25060,
                    "database": "orderbook",
                    "user": "doadmin",
                    "password": "from_env",
                    "pool_size": 10,
                    "batch_size": 50,
                },
            }
        )
    )
    s = Settings.from_json(path)
    assert (s.host, s.name, s.pool_size, s.batch_size) == (
        "db-pg-1.b.db.ondigitalocean.com",
        "orderbook",
        10,
        50,
    )
    assert s.password is not None and s.password.get_secret_value() == SECRET


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("DB_PORT", "not-a-port", "DB_PORT"),
        ("DB_PORT", "70000", "DB_PORT"),
        ("DB_SSLMODE", "sometimes", "DB_SSLMODE"),
        ("DB_POOL_SIZE", "0", "DB_POOL_SIZE"),
        ("DB_BATCH_SIZE", "-5", "DB_BATCH_SIZE"),
    ],
)
def test_bad_value_names_the_variable_and_the_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str
) -> None:
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("DB_PASSWORD", SECRET)
    with pytest.raises(ConfigError) as info:
        Settings()
    message = str(info.value)
    assert field in message and repr(value) in message
    assert SECRET not in message


def test_bad_database_url_error_hides_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(database_url=f"mysql://root:{SECRET}@h:1/d")
    assert "DATABASE_URL" in str(info.value) and SECRET not in str(info.value)


def test_sslmode_becomes_asyncpg_ssl_argument(tmp_path: Path) -> None:
    assert Settings(sslmode="require").ssl_argument() == "require"
    assert Settings(sslmode="disable").ssl_argument() == "disable"
    with pytest.raises(ConfigError, match="DB_SSLROOTCERT"):
        Settings(sslmode="verify-full", sslrootcert=tmp_path / "missing.crt").ssl_argument()


def test_verify_modes_build_a_verifying_context() -> None:
    cafile = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")
    full = Settings(sslmode="verify-full", sslrootcert=cafile).ssl_argument()
    ca = Settings(sslmode="verify-ca", sslrootcert=cafile).ssl_argument()
    assert isinstance(full, ssl.SSLContext) and full.check_hostname
    assert isinstance(ca, ssl.SSLContext) and not ca.check_hostname
    assert ca.verify_mode == ssl.CERT_REQUIRED


def test_password_hidden_from_repr_str_and_engine_url() -> None:
    s = Settings(database_url=DO_URL)
    assert SECRET not in repr(s) and SECRET not in str(s)
    engine = create_engine(s)
    assert SECRET not in str(engine.url) and SECRET not in repr(engine.url)
    assert SECRET not in repr(engine)


async def test_unreachable_server_gives_one_line_without_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    s = Settings(host="127.0.0.1", port=1, user="collector", password=SECRET, sslmode="disable")
    engine = create_engine(s)
    with pytest.raises(DatabaseUnavailable) as info:
        async with engine.connect():
            pass
    await engine.dispose()
    message = str(info.value)
    assert "\n" not in message
    for part in ("127.0.0.1:1", "collector", "defaultdb"):
        assert part in message
    assert SECRET not in message and SECRET not in caplog.text


def test_cli_failure_is_one_line_without_password(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orderbook_store", "upgrade"],
        env={
            "DB_HOST": "127.0.0.1",
            "DB_PORT": "1",
            "DB_PASSWORD": SECRET,
            "DB_SSLMODE": "disable",
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 1
    assert "cannot connect to PostgreSQL at 127.0.0.1:1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert SECRET not in result.stdout + result.stderr
