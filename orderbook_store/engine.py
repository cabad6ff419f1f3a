"""``create_engine(settings)``: the one place connections to PostgreSQL are made.

Connections are opened by asyncpg with keyword arguments built from ``Settings`` (SSL context,
timeouts, ``application_name``), so the password never enters a URL string and cannot leak
through ``str(engine.url)``. A server that cannot be reached raises ``DatabaseUnavailable`` with
one line naming host, port, database, user and the reason.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
import weakref
from collections.abc import Awaitable, Callable

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .errors import DatabaseUnavailable
from .settings import Settings

#: Opens one asyncpg connection (what SQLAlchemy's ``async_creator`` expects).
ConnectFn = Callable[[], Awaitable[asyncpg.Connection]]

_SETTINGS: weakref.WeakKeyDictionary[AsyncEngine, Settings] = weakref.WeakKeyDictionary()


def create_engine(settings: Settings | None = None) -> AsyncEngine:
    """An ``AsyncEngine`` on asyncpg with the pool size, pre-ping, SSL and timeouts of ``settings``.

    Nothing connects until first use. ``Settings()`` (environment and ``.env``) when omitted.
    """
    settings = settings if settings is not None else Settings()
    connect = connector(settings)
    statement_cache_size = 0 if settings.behind_pgbouncer else 100

    def creator() -> object:
        # SQLAlchemy's own async_creator path, plus the statement options PgBouncer needs.
        return engine.sync_engine.dialect.dbapi.connect(  # type: ignore[union-attr]
            async_creator_fn=connect,
            prepared_statement_cache_size=statement_cache_size,
            prepared_statement_name_func=_unique_statement_name
            if settings.behind_pgbouncer
            else None,
        )

    engine = create_async_engine(
        settings.sqlalchemy_url(),
        creator=creator,
        pool_size=settings.pool_size,
        max_overflow=max(2, settings.pool_size // 2),
        pool_pre_ping=True,
        pool_timeout=settings.connect_timeout_s * 3,
        pool_recycle=1800,
    )
    _SETTINGS[engine] = settings
    return engine


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
    secret = settings.password.get_secret_value() if settings.password else ""
    if secret:
        reason = reason.replace(secret, "***")
    return DatabaseUnavailable(
        f"cannot connect to PostgreSQL at {settings.host}:{settings.port} "
        f"(database {settings.name!r}, user {settings.user!r}, sslmode {settings.sslmode}): "
        f"{reason}"
    )
