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

    The message is one line: host, port, database, user and the reason.
    """


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
