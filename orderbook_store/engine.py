"""``create_engine(settings)``: the one place connections to PostgreSQL are made.

Connections are opened by asyncpg with keyword arguments built from ``Settings`` (SSL context,
timeouts, ``application_name``), so the password never enters a URL string and cannot leak
through ``str(engine.url)``. A server that cannot be reached raises ``DatabaseUnavailable`` with
one line naming host, port, database, user and the reason.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import uuid
import weakref
from collections.abc import Awaitable, Callable

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from orderbook_store.errors import DatabaseUnavailable
from orderbook_store.settings import Settings

#: Opens one asyncpg connection (what SQLAlchemy's ``async_creator`` expects).
ConnectFn = Callable[[], Awaitable[asyncpg.Connection]]

log = logging.getLogger(__name__)

_SETTINGS: weakref.WeakKeyDictionary[AsyncEngine, Settings] = weakref.WeakKeyDictionary()


def create_engine(settings: Settings | None = None) -> AsyncEngine:
    """An ``AsyncEngine`` on asyncpg with the pool size, pre-ping, SSL and timeouts of ``settings``.

    Nothing connects until first use. ``Settings()`` (environment and ``.env``) when omitted.
    """
    settings = settings if settings is not None else Settings()
    return _engine(settings, connector(settings), settings.behind_pgbouncer, pool_recycle_s=1800)


def _engine(
    settings: Settings, connect: ConnectFn, behind_pgbouncer: bool, *, pool_recycle_s: int
) -> AsyncEngine:
    statement_cache_size = 0 if behind_pgbouncer else 100

    def creator() -> object:
        # SQLAlchemy's own async_creator path, plus the statement options PgBouncer needs.
        return engine.sync_engine.dialect.dbapi.connect(  # type: ignore[union-attr]
            async_creator_fn=connect,
            prepared_statement_cache_size=statement_cache_size,
            prepared_statement_name_func=_unique_statement_name if behind_pgbouncer else None,
        )

    engine = create_async_engine(
        settings.sqlalchemy_url(),
        creator=creator,
        pool_size=settings.pool_size,
        max_overflow=max(2, settings.pool_size // 2),
        pool_pre_ping=True,
        pool_timeout=settings.connect_timeout_s * 3,
        pool_recycle=pool_recycle_s,
    )
    _SETTINGS[engine] = settings
    return engine


#: Seconds the read node's replay is behind: 0 when it has replayed all it received (or is
#: not a replica at all), else the age of the last replayed commit; NULL when unknown.
_REPLICA_LAG_SQL = """
SELECT CASE
    WHEN NOT pg_is_in_recovery() THEN 0
    WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
    ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8
END
"""


def create_read_engine(settings: Settings | None = None) -> AsyncEngine:
    """An engine for reads: on the read-only node (``DB_READ_URL``/``DB_READ_HOST``) when set.

    Each new pooled connection tries the read node first; when it cannot be reached, or its
    replay is more than ``read_max_lag_s`` (``DB_READ_MAX_LAG_S``) behind, one warning is
    logged and that connection goes to the primary instead, so reads keep working. Pooled
    connections are recycled every minute, so reads return to the read node once it is back
    or caught up. Costs one extra round trip per new connection. Without a read node this is
    ``create_engine(settings)``. Writes and migrations never use this engine.
    """
    settings = settings if settings is not None else Settings()
    replica = settings.read_settings()
    if replica is None:
        return create_engine(settings)
    to_primary = connector(settings)
    to_replica = connector(replica)
    max_lag_s = settings.read_max_lag_s

    async def connect() -> asyncpg.Connection:
        try:
            conn = await to_replica()
        except DatabaseUnavailable as exc:
            log.warning("read node unavailable, reading from the primary: %s", exc)
            return await to_primary()
        try:
            lag = await conn.fetchval(_REPLICA_LAG_SQL, timeout=settings.connect_timeout_s)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            lag = None
        lag_s = math.inf if lag is None else float(lag)
        if lag_s <= max_lag_s:
            return conn
        await conn.close(timeout=settings.connect_timeout_s)
        log.warning(
            "read node %s is %s s behind (limit %g s, DB_READ_MAX_LAG_S), reading from the "
            "primary %s",
            replica.describe(),
            "an unknown number of" if lag is None else f"{lag_s:.1f}",
            max_lag_s,
            settings.describe(),
        )
        return await to_primary()

    pgbouncer = settings.behind_pgbouncer or replica.behind_pgbouncer
    return _engine(replica, connect, pgbouncer, pool_recycle_s=60)


def _unique_statement_name() -> str:
    return f"__obs_{uuid.uuid4().hex}__"


def settings_of(engine: AsyncEngine) -> Settings:
    """The ``Settings`` an engine was made from (``Settings()`` for engines made elsewhere)."""
    found = _SETTINGS.get(engine)
    return found if found is not None else Settings()


def connector(settings: Settings) -> ConnectFn:
    """A coroutine function opening one asyncpg connection, with errors made readable."""
    kwargs = settings.asyncpg_connect_kwargs()

    async def connect() -> asyncpg.Connection:
        try:
            return await asyncpg.connect(**kwargs)
        except (
            OSError,
            asyncio.TimeoutError,
            ssl.SSLError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
        ) as exc:
            raise unavailable(settings, exc) from None

    return connect


def unavailable(settings: Settings, exc: BaseException) -> DatabaseUnavailable:
    """One line: where we tried to connect, as whom, and why it failed; never the password."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, asyncio.TimeoutError):
        reason = f"no answer within {settings.connect_timeout_s:g} s (connect timeout)"
    elif isinstance(exc, ssl.SSLCertVerificationError):
        reason += (
            " (the server's certificate was not accepted: DB_SSLROOTCERT must be the cluster's"
            " CA certificate, and with verify-full DB_HOST a name the certificate is for)"
        )
    secret = settings.password.get_secret_value() if settings.password else ""
    if secret:
        reason = reason.replace(secret, "***")
    error = DatabaseUnavailable(
        f"cannot connect to PostgreSQL at {settings.host}:{settings.port} "
        f"(database {settings.name!r}, user {settings.user!r}, sslmode {settings.sslmode}): "
        f"{reason}"
    )
    error.origin = exc
    return error
