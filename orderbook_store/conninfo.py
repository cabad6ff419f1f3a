"""libpq connection URLs (``DATABASE_URL``): read them as libpq does, show them without secrets.

``parse_url`` follows libpq's own URI grammar, not a web URL's, so a URL means here what it
means to ``psql``: ``postgresql://[user[:password]@][host][:port][/dbname][?key=value&...]``,
every part percent-decoded (``+`` stays a plus), the user ending at the first ``:`` and the
credentials at the first ``@`` before any ``/``, so a raw ``#``, ``?``, ``:``, ``[`` or ``]`` in
a password works as it does in libpq. Query parameters (``password``, ``user``, ``host``,
``port``, ``dbname``, ``sslmode``...) override the parts before them, the last one winning.

What libpq would misread is refused here, without showing the password: a raw ``/`` or ``@``
in a password (libpq then takes pieces of it for host, port or database name; both must be
percent-encoded, ``%2F`` and ``%40``) and a broken ``%`` escape. Errors name the problem,
never the URL; ``redact_url`` shows a URL with its password as ``***``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from pydantic import SecretStr

from orderbook_store.errors import ConfigError

__all__ = ["parse_url", "redact_url"]

_SCHEMES = ("postgresql://", "postgres://", "postgresql+asyncpg://")

#: Query keys this package uses, and the ``Settings`` field each fills.
_QUERY_FIELDS = {
    "host": "host",
    "port": "port",
    "dbname": "name",
    "user": "user",
    "password": "password",
    "sslmode": "sslmode",
    "sslrootcert": "sslrootcert",
    "application_name": "application_name",
    "connect_timeout": "connect_timeout_s",
}

#: Fields only the query sets: shown again by ``redact_url``.
_QUERY_ONLY = ("sslmode", "sslrootcert", "application_name", "connect_timeout_s")
_ENCODING_HINT = (
    "percent-encode reserved characters in the user name and password "
    "(/ as %2F, @ as %40, % as %25; urllib.parse.quote(password, safe='') does it)"
)


def parse_url(url: str, *, variable: str = "DATABASE_URL") -> dict[str, Any]:
    """The parts of a libpq URL as ``Settings`` fields (``host``, ``port``, ``name``,
    ``user``, ``password`` as a ``SecretStr``, ``sslmode``...), only those the URL sets.

    Raises ``ConfigError`` naming ``variable`` and the problem for anything libpq would refuse
    or misread; the URL itself is not shown (it may hold a password).
    """

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{variable}: {problem}")

    scheme = next((s for s in _SCHEMES if url.startswith(s)), None)
    if scheme is None:
        raise fail(f"the scheme must be postgresql:// (got {_scheme_of(url)!r})")
    rest = url[len(scheme) :]
    parts: dict[str, Any] = {}
    at = _credentials_end(rest)
    if at is not None:
        credentials, rest = rest[:at], rest[at + 1 :]
        user, colon, password = credentials.partition(":")
        if user:
            parts["user"] = _decode(user, "the user name", fail)
        if colon and password:
            parts["password"] = SecretStr(_decode(password, "the password", fail))
    head, _, query = rest.partition("?")
    if "@" in head:
        # libpq would read pieces of a password for host, port or database name.
        raise fail(f"a raw '@' or '/' in the user name or password: {_ENCODING_HINT}")
    hostport, slash, dbname = head.partition("/")
    host, port = _split_host_port(hostport, fail)
    if host:
        parts["host"] = _decode(host, "the host", fail)
    if port is not None:
        parts["port"] = port
    if slash and dbname:
        parts["name"] = _decode(dbname, "the database name", fail)
    for item in query.split("&") if query else ():
        if not item:
            continue
        key, equals, value = item.partition("=")
        if not equals:
            raise fail(f"a query parameter without '=': {_ENCODING_HINT}")
        field = _QUERY_FIELDS.get(_decode(key, "a query parameter's name", fail))
        if field is None:
            continue  # a libpq parameter this package does not use
        decoded = _decode(value, f"the value of {field}", fail)
        if field == "port":
            parts["port"] = _port(decoded, fail)
        elif field == "password":
            if decoded:
                parts["password"] = SecretStr(decoded)
        elif decoded or field != "user":
            parts[field] = decoded
    if "," in str(parts.get("host", "")):
        raise fail("several hosts: name one server (the primary; a read node is DB_READ_URL)")
    return parts


def _scheme_of(url: str) -> str:
    scheme = url.split("://", 1)[0] if "://" in url else ""
    return scheme if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,30}", scheme) else "none"


def _credentials_end(rest: str) -> int | None:
    """Index of the ``@`` ending ``user[:password]``, as libpq finds it: the first ``@``
    before any ``/``; ``None`` when the URL has no credentials."""
    for index, char in enumerate(rest):
        if char == "@":
            return index
        if char == "/":
            return None
    return None


def _split_host_port(hostport: str, fail: Callable[[str], ConfigError]) -> tuple[str, int | None]:
    if hostport.startswith("["):  # an IPv6 address
        close = hostport.find("]")
        if close <= 1:
            raise fail("an IPv6 host must be written [address]")
        host, after = hostport[1:close], hostport[close + 1 :]
        if after and not after.startswith(":"):
            raise fail("expected ':port' after the IPv6 address")
        port_text = after[1:]
    else:
        host, _, port_text = hostport.partition(":")
    return host, (_port(port_text, fail) if port_text else None)


def _port(text: str, fail: Callable[[str], ConfigError]) -> int:
    if "," in text:
        raise fail("several hosts: name one server (the primary; a read node is DB_READ_URL)")
    if not (text.isascii() and text.isdigit()):
        raise fail(f"the port is not a number ({_ENCODING_HINT})")
    return int(text)


def _decode(text: str, what: str, fail: Callable[[str], ConfigError]) -> str:
    """libpq's percent-decoding: ``%XX`` only, ``+`` kept, the result UTF-8."""
    if re.search(r"%(?![0-9A-Fa-f]{2})", text):
        raise fail(f"a '%' in {what} that is not a %XX escape: {_ENCODING_HINT}")
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise fail(f"{what} is not UTF-8 once percent-decoded") from None


def redact_url(url: str) -> str:
    """``url`` fit to show: rebuilt from its parts with the password as ``***``; when it
    cannot be parsed, only its scheme (any part of it could be a password)."""
    try:
        parts = parse_url(url)
    except ConfigError:
        return f"{_scheme_of(url)}://***"
    netloc = ""
    if "user" in parts or "password" in parts:
        netloc = quote(parts.get("user", ""), safe="")
        netloc += ":***@" if "password" in parts else "@"
    host = str(parts.get("host", ""))
    netloc += f"[{host}]" if ":" in host else quote(host, safe="")
    if "port" in parts:
        netloc += f":{parts['port']}"
    text = f"postgresql://{netloc}"
    if "name" in parts:
        text += "/" + quote(str(parts["name"]), safe="")
    query = [
        f"{key}={quote(str(parts[field]), safe='')}"
        for key, field in _QUERY_FIELDS.items()
        if field in _QUERY_ONLY and field in parts
    ]
    return text + ("?" + "&".join(query) if query else "")
