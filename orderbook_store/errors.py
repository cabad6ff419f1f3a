"""One exception family, so callers can catch everything this package raises in one place.

Messages name the field, the value and what to do about it. They never carry the database
password: connection errors are rebuilt from host, port, database and user only.
"""

from __future__ import annotations


class OrderbookStoreError(Exception):
    """Base of every error raised by orderbook_store."""


class ConfigError(OrderbookStoreError, ValueError):
    """A setting has a value that cannot work (names the variable and the value, never a secret)."""


class DatabaseUnavailable(OrderbookStoreError, ConnectionError):
    """The server could not be reached or refused the connection.

    The message is one line: host, port, database, user and the reason. ``origin`` is the
    driver's exception, kept for classifying the failure (it is not chained, so tracebacks
    stay one line).
    """

    origin: BaseException | None = None


class InvalidArgument(OrderbookStoreError, ValueError):
    """An argument of a read or an operation cannot work: a time that is not a time, an unknown
    output or column, a frequency that is not a duration. Names the argument and the value."""


class InvalidQuote(OrderbookStoreError, ValueError):
    """One incoming quote broke a rule. Names the field and the offending value.

    Raised for that quote only; quotes before and after it are unaffected.
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"invalid quote: {field}={shown}: {reason}")


class WriterClosed(OrderbookStoreError):
    """``add()`` was called once the writer's ``close()`` had begun: the quote was not taken.
    From ``add_many``, ``accepted`` is how many of its quotes were taken before that (they are
    written or spooled by the ``close()``)."""

    accepted: int = 0


class WriterBackpressure(OrderbookStoreError):
    """``add()`` refused a quote because ``max_pending`` rows are held in memory and cannot go
    to the spool (it is unusable, or the disk cannot keep up). The quote was not taken; the
    caller may retry it once the writer catches up. ``accepted`` is how many quotes of an
    ``add_many`` call were taken before it."""

    accepted: int = 0


class WritesBlocked(DatabaseUnavailable):
    """The server refuses the writer for a reason retrying cannot fix (password, privileges,
    missing schema, TLS, a read-only node). The rows are kept (in the spool) and written once
    the cause is fixed; the message says what to fix. ``fix`` is that advice alone."""

    fix: str = ""


class RowsLost(OrderbookStoreError):
    """``close()`` could neither write nor spool some rows (the database was down and the
    spool unusable). ``rows`` is how many; the message says why."""

    def __init__(self, message: str, rows: int) -> None:
        super().__init__(message)
        self.rows = rows


class SchemaNotMigrated(OrderbookStoreError):
    """The database lacks this package's tables: it was never migrated (or the settings name
    another database). The message names the database and the command that fixes it."""


class LakeUnavailable(OrderbookStoreError, OSError):
    """The lake (``LAKE_URL`` or an export's directory) could not be listed, read or written:
    a missing bucket, a refused key, an unreachable endpoint, a directory without write
    permission. The message names the lake's printable URL, the store's words and what to
    check; never the secret key."""


class LakeUnreadable(LakeUnavailable):
    """A file the lake's catalog names for a read could not be read (missing, unreachable
    store, refused key). The message names the lake (``LAKE_URL``, no secret) and the file;
    the read returns nothing rather than fewer rows."""


class SymbolCaseWarning(UserWarning):
    """A read found nothing for a symbol that is stored under another spelling (symbols are
    case-sensitive: ``btcusdt`` is not ``BTCUSDT``). The message names the stored spelling."""
