"""Alembic, driven from Python with the package's ``Settings`` (used by the CLI, demo and tests).

The revisions live in the top-level ``alembic/`` directory beside ``alembic.ini``; ``alembic``
on the command line and these functions run the very same scripts.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from orderbook_store.errors import ConfigError
from orderbook_store.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ALEMBIC_INI = PROJECT_ROOT / "alembic.ini"


def alembic_config(settings: Settings | None = None, *, configure_logging: bool = False) -> Config:
    """An Alembic ``Config`` whose ``env.py`` connects with ``settings``, not alembic.ini."""
    if not ALEMBIC_INI.is_file():
        raise ConfigError(
            f"alembic.ini not found at {ALEMBIC_INI}: install the package from its source tree "
            "(pip install -e .) so the migrations are available"
        )
    config = Config(str(ALEMBIC_INI))
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
