"""DATABASE_URL is read as libpq reads it, and its password never shows.

Logging in for real with such passwords, in every form, is in test_security.py.
"""

from __future__ import annotations

import os
import secrets
import traceback
from pathlib import Path
from urllib.parse import quote

import pytest
from pydantic import SecretStr

from orderbook_store.conninfo import parse_url, redact_url
from orderbook_store.errors import ConfigError
from orderbook_store.settings import Settings

RESERVED = ["/", "#", "?", "@", "%", ":", "[", "]"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No DB_*, PG* variables or .env from the developer's shell leak into these tests."""
    for name in list(os.environ):
        if name.startswith(("DB_", "PG")) or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _password(char: str) -> str:
    return f"Pw{char}{secrets.token_hex(6)}{char}end"


def _shown(settings: Settings) -> str:
    return repr(settings) + str(settings) + settings.describe() + str(settings.sqlalchemy_url())


@pytest.mark.parametrize("char", RESERVED)
def test_a_percent_encoded_password_with_a_reserved_character_is_read_and_hidden(
    char: str,
) -> None:
    password = _password(char)
    url = f"postgresql://collector:{quote(password, safe='')}@db.example.com:25060/quotes"
    settings = Settings(database_url=url)
    assert settings.password is not None and settings.password.get_secret_value() == password
    assert (settings.user, settings.host, settings.port, settings.name) == (
        "collector",
        "db.example.com",
        25060,
        "quotes",
    )
    shown = _shown(settings)
    assert "collector:***@db.example.com:25060/quotes" in shown
    assert password not in shown and quote(password, safe="") not in shown


@pytest.mark.parametrize("char", RESERVED)
def test_the_password_query_parameter_is_used_and_hidden(char: str) -> None:
    password = _password(char)
    url = f"postgresql://db.example.com/quotes?user=collector&password={quote(password, safe='')}"
    settings = Settings(database_url=url)
    assert settings.password is not None and settings.password.get_secret_value() == password
    assert settings.user == "collector"
    shown = _shown(settings)
    assert password not in shown and quote(password, safe="") not in shown
    assert "'postgresql://collector:***@db.example.com/quotes'" in shown


@pytest.mark.parametrize("char", ["#", "?", ":", "[", "]"])
def test_reserved_characters_libpq_takes_raw_work_raw(char: str) -> None:
    """libpq ends the user name at the first ':' and the credentials at the first '@' before
    any '/': these characters need no encoding there (a web URL parser would cut at them)."""
    password = _password(char)
    settings = Settings(database_url=f"postgresql://collector:{password}@db.example.com/quotes")
    assert settings.password is not None and settings.password.get_secret_value() == password
    assert (settings.host, settings.name) == ("db.example.com", "quotes")
    assert password not in _shown(settings)


@pytest.mark.parametrize("char", ["/", "@", "%"])
def test_reserved_characters_libpq_misreads_raw_are_refused_without_the_password(
    char: str,
) -> None:
    password = _password(char)
    with pytest.raises(ConfigError) as caught:
        Settings(database_url=f"postgresql://collector:{password}@db.example.com:25060/quotes")
    message = str(caught.value)
    assert "DATABASE_URL" in message and "percent-encode" in message
    for piece in password.split(char):
        assert piece not in message
    whole = "".join(traceback.format_exception(caught.value))
    assert password not in whole and "Traceback" in whole


def test_query_parameters_override_the_parts_before_them() -> None:
    parts = parse_url(
        "postgresql://old:pw@old-host:1/old-db"
        "?user=new%40corp&host=%2Fvar%2Frun%2Fpostgresql&port=6432&dbname=new%2Bdb"
        "&sslmode=verify-full&application_name=a+b&connect_timeout=4&target_session_attrs=any"
    )
    assert parts == {
        "user": "new@corp",
        "password": SecretStr("pw"),
        "host": "/var/run/postgresql",
        "port": 6432,
        "name": "new+db",  # "+" is a plus to libpq, not a space
        "sslmode": "verify-full",
        "application_name": "a+b",
        "connect_timeout_s": "4",
    }


def test_ipv6_host_and_percent_encoded_user() -> None:
    settings = Settings(database_url="postgresql://us%3Aer:x@[2001:db8::1]:5433/d")
    assert (settings.user, settings.host, settings.port, settings.name) == (
        "us:er",
        "2001:db8::1",
        5433,
        "d",
    )
    assert "[2001:db8::1]:5433" in repr(settings)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mysql://root:Pw-secret@h/d", "scheme"),
        ("postgresql://u:Pw-secret@h:port/d", "port is not a number"),
        ("postgresql://u:Pw-secret@h1,h2/d", "several hosts"),
        ("postgresql://u:Pw-secret@h/d?password", "without '='"),
        ("postgresql://u:Pw-secret@[::1/d", "IPv6"),
    ],
)
def test_bad_urls_name_the_problem_without_the_password(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(database_url=url)
    assert problem in str(caught.value) and "DATABASE_URL" in str(caught.value)
    assert "Pw-secret" not in str(caught.value)
    assert "Pw-secret" not in redact_url(url)


def test_pgpassword_is_the_last_resort(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "from-pgpassword")
    assert Settings(database_url="postgresql://u@h/d").password.get_secret_value() == (  # type: ignore[union-attr]
        "from-pgpassword"
    )
    with_url = Settings(database_url="postgresql://u:from-url@h/d")
    assert with_url.password.get_secret_value() == "from-url"  # type: ignore[union-attr]
    monkeypatch.setenv("DB_PASSWORD", "from-db-password")
    assert Settings(database_url="postgresql://u:from-url@h/d").password.get_secret_value() == (  # type: ignore[union-attr]
        "from-db-password"
    )
    assert Settings(password=None).password is None  # an explicit argument wins
    assert "from-pgpassword" not in repr(Settings())


def test_read_url_is_parsed_the_same_way() -> None:
    password = _password("#")
    settings = Settings(
        database_url="postgresql://u:p@primary/d",
        read_url=f"postgresql://reader:{password}@replica:5433/d?sslmode=require",
    )
    replica = settings.read_settings()
    assert replica is not None
    assert (replica.host, replica.port, replica.user) == ("replica", 5433, "reader")
    assert replica.password is not None and replica.password.get_secret_value() == password
    assert password not in repr(settings)
