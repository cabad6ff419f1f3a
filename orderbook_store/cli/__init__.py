"""``orderbook-store``: operations on the quote store from the shell.

Every command reads the same ``Settings`` as the library (``DB_*``, ``.env``, ``DATABASE_URL``).
Errors print one line and exit non-zero; secrets never reach the output.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from orderbook_store.cli import files as cli_files
from orderbook_store.cli import ops as cli_ops
from orderbook_store.cli.partitions import app as partitions_app
from orderbook_store.errors import OrderbookStoreError
from orderbook_store.ops import migrations
from orderbook_store.settings import Settings

app = typer.Typer(
    help="Store and read best bid/ask quotes in PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

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


cli_files.register(app)
cli_ops.register(app)
app.add_typer(partitions_app, name="partitions")


def main() -> None:
    """Console entry point: one line on stderr and exit 1 for any error of ours."""
    try:
        app()
    except OrderbookStoreError as exc:
        typer.echo(f"orderbook-store: {exc}", err=True)
        sys.exit(1)
