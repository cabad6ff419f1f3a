"""``orderbook-store upgrade``, ``stamp`` and ``current``: the schema, through Alembic, with the
library's settings."""

from __future__ import annotations

from typing import Annotated

import typer

from orderbook_store.cli.common import run_with_engine
from orderbook_store.ops import migrations
from orderbook_store.settings import Settings

app = typer.Typer()

Revision = Annotated[str, typer.Argument(help="Target revision.")]


@app.command()
def upgrade(revision: Revision = "head") -> None:
    """Bring the schema up to REVISION (default: head), like `alembic upgrade head`."""
    migrations.upgrade(Settings(), revision)
    typer.echo(f"database at {revision}")


@app.command()
def stamp(revision: Revision = "0001") -> None:
    """Adopt a database made by hand from the original DDL: record it as being at REVISION."""
    migrations.stamp(Settings(), revision)
    typer.echo(f"database stamped at {revision}")


@app.command()
def current() -> None:
    """Show the revision the database is at, and the newest one this package knows."""
    at = run_with_engine(migrations.current_revision)
    head = migrations.head_revision()
    if at == head:
        typer.echo(f"database at {at} (head)")
    elif at is None:
        typer.echo(f"database not migrated (head is {head}): run `orderbook-store upgrade`")
    else:
        typer.echo(f"database at {at}, head is {head}: run `orderbook-store upgrade`")
