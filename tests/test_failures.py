"""The failure table: each kind of error the server or the network gives goes to its class.

The exceptions are asyncpg's own classes (as the driver raises them) and SQLAlchemy's wrapper
around them; the writer's behaviour per class is exercised on real servers in
test_writer_failures.py and test_writer_faults.py.
"""

from __future__ import annotations

import asyncio
import ssl

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError

from orderbook_store.errors import DatabaseUnavailable
from orderbook_store.write.failures import FailureClass, classify

PASSING, TOO_BIG, REFUSED, CONFIG = (
    FailureClass.PASSING,
    FailureClass.TOO_BIG,
    FailureClass.ROWS_REFUSED,
    FailureClass.CONFIGURATION,
)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (asyncpg.exceptions.ConnectionDoesNotExistError("gone"), PASSING),
        (asyncpg.exceptions.AdminShutdownError("shutting down"), PASSING),
        (asyncpg.exceptions.CannotConnectNowError("starting up"), PASSING),
        (asyncpg.exceptions.TooManyConnectionsError("too many"), PASSING),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock"), PASSING),
        (asyncpg.exceptions.SerializationError("serialization"), PASSING),
        (ConnectionRefusedError(111, "refused"), PASSING),
        (asyncio.TimeoutError(), PASSING),
        (RuntimeError("something unforeseen"), PASSING),
        (asyncpg.exceptions.QueryCanceledError("statement timeout"), TOO_BIG),
        (asyncpg.exceptions.LockNotAvailableError("lock timeout"), TOO_BIG),
        (asyncpg.exceptions.CheckViolationError("check"), REFUSED),
        (asyncpg.exceptions.UniqueViolationError("unique"), REFUSED),
        (asyncpg.exceptions.NotNullViolationError("not null"), REFUSED),
        (asyncpg.exceptions.UntranslatableCharacterError("encoding"), REFUSED),
        (asyncpg.exceptions.NumericValueOutOfRangeError("overflow"), REFUSED),
        (asyncpg.exceptions.InvalidPasswordError("password"), CONFIG),
        (asyncpg.exceptions.InvalidAuthorizationSpecificationError("pg_hba"), CONFIG),
        (asyncpg.exceptions.InsufficientPrivilegeError("permission denied"), CONFIG),
        (asyncpg.exceptions.UndefinedTableError("no table"), CONFIG),
        (asyncpg.exceptions.UndefinedColumnError("no column"), CONFIG),
        (asyncpg.exceptions.InvalidCatalogNameError("no database"), CONFIG),
        (asyncpg.exceptions.ReadOnlySQLTransactionError("standby"), CONFIG),
        (ssl.SSLCertVerificationError("certificate verify failed"), CONFIG),
        (ConnectionError("PostgreSQL server at x rejected SSL upgrade"), CONFIG),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_each_error_has_its_class(error: BaseException, kind: FailureClass) -> None:
    assert classify(error).kind is kind


def test_the_class_is_found_through_sqlalchemy_and_the_connector_wrappers() -> None:
    driver = asyncpg.exceptions.UndefinedTableError('relation "orderbook_data" does not exist')
    wrapped = DBAPIError("INSERT ...", {}, driver)
    assert classify(wrapped).kind is CONFIG
    assert classify(wrapped).sqlstate == "42P01"

    unavailable = DatabaseUnavailable("cannot connect to PostgreSQL at h:1: password ...")
    unavailable.origin = asyncpg.exceptions.InvalidPasswordError("password failed")
    failure = classify(unavailable, user="collector")
    assert failure.kind is CONFIG
    assert "DB_PASSWORD" in failure.fix and "collector" in failure.fix


def test_configuration_failures_say_what_to_do() -> None:
    def fix(error: BaseException) -> str:
        return classify(error, user="writer", database="quotes").fix

    assert "orderbook-store upgrade" in fix(asyncpg.exceptions.UndefinedTableError("x"))
    assert "GRANT INSERT ON orderbook_data" in fix(
        asyncpg.exceptions.InsufficientPrivilegeError("x")
    )
    assert "TO writer" in fix(asyncpg.exceptions.InsufficientPrivilegeError("x"))
    assert "DB_NAME" in fix(asyncpg.exceptions.InvalidCatalogNameError("x"))
    assert "DB_SSLMODE=disable or prefer" in fix(ConnectionError("rejected SSL upgrade"))
    assert "DB_SSLROOTCERT" in fix(ssl.SSLCertVerificationError("verify failed"))
    assert "primary" in fix(asyncpg.exceptions.ReadOnlySQLTransactionError("x"))
    assert classify(asyncpg.exceptions.CheckViolationError("x")).fix == ""
