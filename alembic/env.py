"""Alembic environment: async (asyncpg), URL from ``orderbook_store.Settings``, never alembic.ini.

Callers may pass ready ``Settings`` as ``config.attributes["settings"]`` (the CLI and the tests do).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging.config

from alembic import context
from sqlalchemy.engine import Connection

from orderbook_store.engine import create_engine
from orderbook_store.models import Base
from orderbook_store.settings import Settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata
settings: Settings = config.attributes.get("settings") or Settings()


def include_object(obj, name, type_, reflected, compare_to):  # type: ignore[no-untyped-def]
    """Only this package's tables; anything else in the database is not ours to judge."""
    return not (type_ == "table" and reflected and compare_to is None)


def configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        include_object=include_object,
        transaction_per_migration=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade head --sql``); no connection is made."""
    configure(
        url=settings.sqlalchemy_url().render_as_string(hide_password=True),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(run_async_migrations())
        return
    # Called from inside a running loop (a notebook): migrate on a thread with its own loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run_async_migrations()).result()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
