"""Alembic, driven from Python with the package's ``Settings`` (used by the CLI, demo and tests).

The revisions ship inside the package (``orderbook_store/migrations``) and Alembic is configured
here in code, so an installed package (a wheel, ``pip install .``) migrates from any directory
without an alembic.ini. A checkout's ``alembic.ini`` points ``alembic`` on the command line at
the same revisions and the same environment.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.migrations import SCRIPT_DIRECTORY
from orderbook_store.settings import Settings


def alembic_config(settings: Settings | None = None, *, configure_logging: bool = False) -> Config:
    """An Alembic ``Config`` for the package's revisions whose ``env.py`` connects with
    ``settings`` (the environment's ``Settings()`` when None), never with a URL from a file.
    ``configure_logging`` shows Alembic's progress lines on stderr."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_DIRECTORY))
    config.set_main_option("path_separator", "os")
    config.attributes["settings"] = settings if settings is not None else Settings()
    config.attributes["configure_logging"] = configure_logging
    return config


def upgrade(settings: Settings | None = None, revision: str = "head") -> None:
    """``alembic upgrade <revision>`` with these settings."""
    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: Settings | None = None, revision: str = "base") -> None:
    """``alembic downgrade <revision>`` with these settings."""
    command.downgrade(alembic_config(settings), revision)


def stamp(settings: Settings | None = None, revision: str = "0001") -> None:
    """Mark an existing database (made by hand from the original DDL) as being at ``revision``."""
    command.stamp(alembic_config(settings), revision)


def head_revision() -> str | None:
    """The newest revision the code knows."""
    return ScriptDirectory.from_config(alembic_config(Settings())).get_current_head()


def current_revision_of(connection: object) -> str | None:
    """The revision a database is at (``None`` when never migrated), from a sync connection."""
    return MigrationContext.configure(connection).get_current_revision()  # type: ignore[arg-type]


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database behind ``engine`` is at (``None`` when never migrated)."""
    async with engine.connect() as connection:
        return await connection.run_sync(current_revision_of)
