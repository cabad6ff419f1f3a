"""Alembic environment: async (asyncpg), URL from ``orderbook_store.Settings``, never alembic.ini.

Both Alembic entry points call ``run()``: ``orderbook_store/migrations/env.py`` (an installed
package, through ``orderbook_store.ops.migrations`` and the CLI) and the checkout's
``alembic/env.py`` (``alembic upgrade head``). Callers may pass ready ``Settings`` as
``config.attributes["settings"]`` (the CLI and the tests do).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging.config
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from orderbook_store.engine import create_engine
from orderbook_store.models import Base
from orderbook_store.settings import Settings

__all__ = ["run"]


def include_object(obj: Any, name: Any, type_: Any, reflected: Any, compare_to: Any) -> bool:
    """Only this package's tables; anything else in the database is not ours to judge."""
    return not (type_ == "table" and reflected and compare_to is None)


def configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=Base.metadata,
        compare_type=True,
        include_object=include_object,
        transaction_per_migration=True,
        **kwargs,
    )


def run_migrations_offline(settings: Settings) -> None:
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


async def run_async_migrations(settings: Settings) -> None:
    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online(settings: Settings) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(run_async_migrations(settings))
        return
    # Called from inside a running loop (a notebook): migrate on a thread with its own loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run_async_migrations(settings)).result()


def _log_alembic_to_stderr() -> None:
    logger = logging.getLogger("alembic")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-5.5s [%(name)s] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def run() -> None:
    """What an ``env.py`` does: run the migrations Alembic's command asked for."""
    config = context.config
    if config.attributes.get("configure_logging", True):
        if config.config_file_name is not None:
            logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)
        else:  # configured in code: Alembic's progress lines on stderr, as alembic.ini has them
            _log_alembic_to_stderr()
    settings: Settings = config.attributes.get("settings") or Settings()
    if context.is_offline_mode():
        run_migrations_offline(settings)
    else:
        run_migrations_online(settings)
