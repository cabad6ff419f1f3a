"""Alembic, driven from Python with the package's ``Settings`` (used by the CLI, demo and tests).

The revisions ship inside the package (``orderbook_store/migrations``) and Alembic is configured
here in code, so an installed package (a wheel, ``pip install .``) migrates from any directory
without an alembic.ini. A checkout's ``alembic.ini`` points ``alembic`` on the command line at
the same revisions and the same environment.
"""

from __future__ import annotations

import asyncio

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.engine import create_engine
from orderbook_store.errors import ConfigError
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


def stamp(settings: Settings | None = None, revision: str = "0001", *, force: bool = False) -> None:
    """Mark an existing database (made by hand from the original DDL) as being at ``revision``.

    Refuses (``ConfigError``) to record a revision older than the one the database is at, or
    any revision over one this package does not know, unless ``force``: the schema would stay
    as it is while its record went back, and the next upgrade would fail re-creating what
    exists. ``alembic downgrade`` is the way back.
    """
    settings = settings if settings is not None else Settings()
    config = alembic_config(settings)
    if not force:
        _refuse_stamping_down(settings, check_revision(revision, settings))
    command.stamp(config, revision)


def known_revisions() -> list[str]:
    """Every revision this package has, oldest first."""
    script = ScriptDirectory.from_config(alembic_config(Settings()))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def database_revision(settings: Settings | None = None) -> str | None:
    """The revision the database of ``settings`` is at (``None`` when never migrated); opens
    and closes its own connection (call it outside an event loop)."""
    return asyncio.run(_current_revision(settings if settings is not None else Settings()))


def check_revision(revision: str, settings: Settings | None = None) -> str | None:
    """``revision`` resolved to this package's revision id (``None`` for ``base``);
    alembic's ``CommandError`` naming it when the package has no such revision."""
    found = ScriptDirectory.from_config(alembic_config(settings)).get_revision(revision)
    return found.revision if found is not None else None


def _refuse_stamping_down(settings: Settings, target: str | None) -> None:
    current = database_revision(settings)
    if current is None or current == target:
        return
    known = known_revisions()
    if current not in known:
        raise ConfigError(
            f"the database is at revision {current!r}, which this package does not know "
            "(newer code migrated it): upgrade this package instead, or pass --force to "
            f"record {target or 'base'} anyway"
        )
    if target is None or known.index(target) < known.index(current):
        raise ConfigError(
            f"the database is at revision {current}: stamping it at {target or 'base'} would "
            "record an older schema than it has, and the next upgrade would fail; "
            f"`alembic downgrade {target or 'base'}` goes back, --force records it anyway"
        )


async def _current_revision(settings: Settings) -> str | None:
    engine = create_engine(settings.model_copy(update={"pool_size": 1}))
    try:
        return await current_revision(engine)
    finally:
        await engine.dispose()


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
