"""What a failed write means, and what the writer does about it: one small table.

The writer never decides from an error's wording. It takes the SQLSTATE (PostgreSQL's five
character error code) wherever the exception chain carries one, else the exception's type,
and looks it up here:

=============  ===========================================  =====================================
class          examples (SQLSTATE)                          what the writer does
=============  ===========================================  =====================================
passing        connection lost (08), server shutting down   keep the rows, retry with backoff
               or starting (57P01-03), too many
               connections (53300), deadlock or
               serialization (40), no answer in time
too big        statement timeout (57014), lock timeout      split the batch, retry the halves
               (55P03)
rows refused   data exception (22), integrity violation     bisect, write the rest, dead-letter
               (23)                                         the refused rows with the reason
configuration  authentication (28), permission (42501),     keep the rows, retry slowly, and say
               undefined table (42P01), unknown database    what to fix: ``flush()`` raises,
               (3D000), read-only node (25006), TLS         ``stats()`` carries it
               refused or not accepted
=============  ===========================================  =====================================

Anything not in the table (an unknown code, an unexpected exception) is *passing*: the rows are
kept and retried, which can only delay them, never lose them.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
import time
from dataclasses import dataclass

__all__ = [
    "Failure",
    "FailureClass",
    "RepeatFilter",
    "classify",
    "describe",
    "failure_chain",
    "sqlstate_of",
]


class FailureClass(enum.Enum):
    """What kind of failure a write met (see the module docstring's table)."""

    PASSING = "passing"
    TOO_BIG = "too big"
    ROWS_REFUSED = "rows refused"
    CONFIGURATION = "configuration"


#: Exact codes first, then two-character classes.
_BY_SQLSTATE: dict[str, FailureClass] = {
    "57014": FailureClass.TOO_BIG,  # query_canceled (statement_timeout)
    "55P03": FailureClass.TOO_BIG,  # lock_not_available (lock_timeout)
    "42501": FailureClass.CONFIGURATION,  # insufficient_privilege
    "25006": FailureClass.CONFIGURATION,  # read_only_sql_transaction (a standby)
    "57P04": FailureClass.CONFIGURATION,  # database_dropped
    "3D000": FailureClass.CONFIGURATION,  # invalid_catalog_name (unknown database)
    "3F000": FailureClass.CONFIGURATION,  # invalid_schema_name
}
_BY_SQLSTATE_CLASS: dict[str, FailureClass] = {
    "08": FailureClass.PASSING,  # connection exception
    "40": FailureClass.PASSING,  # transaction rollback (deadlock, serialization)
    "53": FailureClass.PASSING,  # insufficient resources (too many connections, disk full)
    "57": FailureClass.PASSING,  # operator intervention (shutdown, starting up)
    "58": FailureClass.PASSING,  # system error (I/O)
    "22": FailureClass.ROWS_REFUSED,  # data exception
    "23": FailureClass.ROWS_REFUSED,  # integrity constraint violation
    "28": FailureClass.CONFIGURATION,  # invalid authorization (password, pg_hba.conf)
    "42": FailureClass.CONFIGURATION,  # syntax error or access rule (missing table/column)
    "0A": FailureClass.CONFIGURATION,  # feature not supported (by a proxy, an old server)
}


@dataclass(frozen=True, slots=True)
class Failure:
    """A classified failure: its class, its SQLSTATE if any, and for configuration failures
    the fix to tell the user."""

    kind: FailureClass
    sqlstate: str | None = None
    fix: str = ""


def failure_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it: SQLAlchemy's ``.orig``, the connection error behind a
    ``DatabaseUnavailable`` (``.origin``), ``__cause__``, ``__context__``."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 8:
        seen.append(current)
        wrapped = getattr(current, "orig", None) or getattr(current, "origin", None)
        if isinstance(wrapped, BaseException) and wrapped not in seen:
            current = wrapped
        else:
            current = current.__cause__ or current.__context__
    return seen


def sqlstate_of(exc: BaseException) -> str | None:
    """The first SQLSTATE found along ``exc``'s chain (asyncpg and SQLAlchemy both carry it)."""
    for link in failure_chain(exc):
        state = getattr(link, "sqlstate", None)
        if isinstance(state, str) and len(state) == 5:
            return state
    return None


def _tls_problem(chain: list[BaseException]) -> str | None:
    for link in chain:
        if isinstance(link, ssl.SSLCertVerificationError):
            return (
                "the server's TLS certificate was not accepted: set DB_SSLROOTCERT to the "
                "cluster's CA certificate (and, with verify-full, DB_HOST to a name the "
                "certificate is for)"
            )
        if isinstance(link, ssl.SSLError):
            return "TLS to the server failed: check DB_SSLMODE and DB_SSLROOTCERT"
        if isinstance(link, ConnectionError) and "rejected SSL upgrade" in str(link):
            return "the server has no TLS: set DB_SSLMODE=disable or prefer"
    return None


def _fix(sqlstate: str, user: str, database: str) -> str:
    if sqlstate == "42501":
        return (
            f"the role {user!r} may not write the quotes: GRANT INSERT ON orderbook_data, "
            f"orderbook_write_batches TO {user}; GRANT USAGE ON ALL SEQUENCES IN SCHEMA "
            "public TO "
            f"{user}; (`orderbook-store roles --print-sql` prints the full set)"
        )
    if sqlstate in ("42P01", "42703", "3F000"):
        return (
            f"the database {database!r} lacks this package's schema: run `orderbook-store "
            "upgrade` (or `alembic upgrade head`)"
        )
    if sqlstate == "3D000":
        return f"the database {database!r} does not exist: check DB_NAME (or DATABASE_URL)"
    if sqlstate == "28P01":
        return f"the password of {user!r} was refused: check DB_PASSWORD (or DATABASE_URL)"
    if sqlstate.startswith("28"):
        return (
            f"the server refuses {user!r} from this host with these settings (pg_hba.conf): "
            "check DB_USER, DB_SSLMODE and the cluster's trusted sources"
        )
    if sqlstate == "25006":
        return "DB_HOST is a read-only node: writes need the primary"
    if sqlstate == "57P04":
        return f"the database {database!r} was dropped: check DB_NAME"
    return "the server refuses these writes; fix the cause it gives and they go through"


def classify(exc: BaseException, *, user: str = "", database: str = "") -> Failure:
    """The class of a failed write (and the fix, for configuration failures).

    ``user`` and ``database`` only fill in the fix's text (a GRANT names the role).
    """
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        # No answer in time, whatever the exception it interrupted (its __context__) was.
        return Failure(FailureClass.PASSING)
    chain = failure_chain(exc)
    tls = _tls_problem(chain)
    if tls is not None:
        return Failure(FailureClass.CONFIGURATION, None, tls)
    state = sqlstate_of(exc)
    if state is not None:
        kind = _BY_SQLSTATE.get(state) or _BY_SQLSTATE_CLASS.get(state[:2], FailureClass.PASSING)
        fix = _fix(state, user, database) if kind is FailureClass.CONFIGURATION else ""
        return Failure(kind, state, fix)
    return Failure(FailureClass.PASSING)  # lost connections, timeouts, and the unknown


def describe(exc: BaseException, *, secret: str = "", write_timeout_s: float = 0.0) -> str:
    """One line about a failure, never containing ``secret``: the server's own error where
    there is one (not the wrappers around it), else the first links of the chain."""
    from orderbook_store.errors import DatabaseUnavailable

    chain = failure_chain(exc)
    with_state = [link for link in chain if sqlstate_of(link) is not None]
    shown: list[BaseException]
    if isinstance(exc, DatabaseUnavailable):
        shown = [exc]  # already one readable line: where, as whom, why
    elif with_state:
        shown = [with_state[-1]]  # the driver's error, as the server said it
    else:
        shown = chain[:3]
    parts: list[str] = []
    for link in shown:
        if isinstance(link, asyncio.TimeoutError):
            parts.append(f"no answer within the write timeout ({write_timeout_s:g} s+)")
        else:
            first = str(link).strip().splitlines()
            name = type(link).__name__
            parts.append(f"{name}: {first[0]}" if first else name)
    text = " <- ".join(parts)
    if secret:
        text = text.replace(secret, "***")
    return text[:300]


class RepeatFilter:
    """Says when a failure message is worth a loud log line: when it changes, and otherwise at
    most once per ``every_s`` seconds, so a failure retried every few seconds is not a flood."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._said: tuple[str | None, float] = (None, float("-inf"))

    def due(self, message: str) -> bool:
        """True (and remembered) when ``message`` should be said now."""
        said, when = self._said
        now = time.monotonic()
        if message != said or now - when >= self.every_s:
            self._said = (message, now)
            return True
        return False
