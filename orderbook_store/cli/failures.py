"""What a failed command says: one line naming the problem and the fix, never a secret.

``explain(exc)`` turns what an ordinary mistake raises (a missing file, an unknown revision, a
server that cannot be reached, a schema never migrated, a privilege the role lacks) into that
line. The server's own words are kept where it gave any; the fix comes from the same table the
writer uses (``write.failures``), worded for a command. Anything else is named as unexpected,
with the way to see its traceback (``--debug``). ``scrub`` takes every password the settings
know out of any text before it is printed.
"""

from __future__ import annotations

import errno
import re

from alembic.util import CommandError

from orderbook_store.errors import DatabaseUnavailable, OrderbookStoreError, WritesBlocked
from orderbook_store.settings import Settings
from orderbook_store.write.failures import FailureClass, classify, failure_chain, sqlstate_of

__all__ = ["current_settings", "explain", "scrub", "secrets_of", "server_words"]

_CONNECT_FIX = (
    "check that the server is running and that DB_HOST and DB_PORT (or DATABASE_URL) name it"
)
_PRIVILEGE_FIX = (
    "connect as a role that has the privilege: the owner role runs upgrade, stamp and "
    "partitions, the writer imports (`orderbook-store roles --print-sql` prints the grants)"
)


#: Server errors whose fix ``write.failures`` words for any command (the schema, the database,
#: the login, a read-only node); the rest are shown as the server said them.
_FIXED_STATES = frozenset({"42P01", "42703", "3F000", "3D000", "25006", "57P04"})


def current_settings() -> Settings | None:
    """``Settings()``, or None when they cannot be read (that failure is reported itself)."""
    try:
        return Settings()
    except OrderbookStoreError:
        return None


def secrets_of(settings: Settings | None) -> list[str]:
    """Every secret ``settings`` holds: the primary's and the read node's passwords, and the
    lake's secret key."""
    if settings is None:
        return []
    found = [settings.password.get_secret_value() if settings.password else ""]
    if settings.lake_secret_access_key is not None:
        found.append(settings.lake_secret_access_key.get_secret_value())
    try:
        replica = settings.read_settings()
    except OrderbookStoreError:
        replica = None
    if replica is not None and replica.password is not None:
        found.append(replica.password.get_secret_value())
    return [secret for secret in found if secret]


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with each secret (and its percent-encoded form) replaced by ``***``."""
    from urllib.parse import quote

    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
    return text


def explain(exc: BaseException) -> str:
    """One line for ``exc``: the problem and what to do about it (no secret in it)."""
    settings = current_settings()
    line = _explain(exc, settings)
    line = " ".join(line.split())  # one line, whatever the server's message held
    return scrub(line, secrets_of(settings))


def _explain(exc: BaseException, settings: Settings | None) -> str:
    user = settings.user if settings is not None else ""
    database = settings.name if settings is not None else ""
    if isinstance(exc, WritesBlocked):
        return str(exc)  # carries its fix
    if isinstance(exc, DatabaseUnavailable):
        failure = classify(exc, user=user, database=database)
        fix = failure.fix if failure.kind is FailureClass.CONFIGURATION else _CONNECT_FIX
        return f"{exc}; {fix}"
    if isinstance(exc, OrderbookStoreError):
        return str(exc)
    if isinstance(exc, CommandError):
        return _alembic(exc)
    state = sqlstate_of(exc)
    if state is not None:
        return _server(exc, state, user, database)
    if isinstance(exc, OSError) and exc.filename is not None:
        return _file(exc)
    if isinstance(exc, MemoryError):
        return "out of memory: give the command fewer or smaller files at a time"
    first = str(exc).strip().splitlines()
    detail = f": {first[0]}" if first else ""
    return (
        f"unexpected error ({type(exc).__name__}{detail}); run again with "
        "`orderbook-store --debug ...` to see where, and report it"
    )


def _alembic(exc: CommandError) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else "alembic failed"
    unknown = re.search(r"Can't locate revision identified by '([^']*)'", message)
    if unknown is None:
        return f"migration refused: {message}"
    from orderbook_store.ops import migrations

    try:
        known = migrations.known_revisions()
    except (OrderbookStoreError, CommandError):
        return f"unknown revision {unknown.group(1)!r}: `orderbook-store upgrade` goes to head"
    return (
        f"unknown revision {unknown.group(1)!r}: this package knows {', '.join(known)} "
        f"(head {known[-1]}); `orderbook-store upgrade` with no revision goes to head"
    )


def server_words(exc: BaseException) -> str:
    """The server's own message: the deepest link of the chain that carries a SQLSTATE."""
    with_state = [link for link in failure_chain(exc) if sqlstate_of(link) is not None]
    link = with_state[-1] if with_state else exc
    lines = str(link).strip().splitlines()
    return lines[0] if lines else type(link).__name__


def _server(exc: BaseException, state: str, user: str, database: str) -> str:
    said = server_words(exc)
    if state == "42501":
        return f"permission denied for {user!r} ({said}): {_PRIVILEGE_FIX}"
    if state.startswith("08") or state in ("57P01", "57P02", "57P03"):
        return f"the connection to the server was lost ({said}): {_CONNECT_FIX}, then run again"
    if state == "55P03":
        return (
            f"{said}: another session holds the lock; run again later (or give "
            "--lock-timeout more seconds)"
        )
    if state in _FIXED_STATES or state.startswith("28"):
        return f"{said}: {classify(exc, user=user, database=database).fix}"
    return f"the server refused: {said} (SQLSTATE {state})"


def _file(exc: OSError) -> str:
    name = str(exc.filename)
    if isinstance(exc, FileNotFoundError):
        return f"{name}: no such file or directory; check the path"
    if isinstance(exc, PermissionError):
        return f"{name}: permission denied; run as a user who may use it, or change its permissions"
    if exc.errno == errno.ENOSPC:
        return f"{name}: no space left on the device; free some, or write elsewhere"
    reason = exc.strerror or str(exc)
    return f"{name}: {reason}"
