"""``orderbook-store``: operations on the quote store from the shell.

Every command reads the same ``Settings`` as the library (``DB_*``, ``.env``, ``DATABASE_URL``).
Errors print one line and exit non-zero; secrets never reach the output. The commands live in
``migrate`` (upgrade, stamp, current), ``files`` (import, verify, export), ``ops`` (doctor, roles,
dead-letters) and ``partitions`` (the ``partitions`` group); ``common`` gives each command its
engine.
"""

from __future__ import annotations

import sys

import typer

from orderbook_store.cli import files, migrate, ops, partitions
from orderbook_store.errors import OrderbookStoreError

app = typer.Typer(
    help="Store and read best bid/ask quotes in PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# One style: each module holds a Typer app of its commands; partitions is a command group.
app.add_typer(migrate.app)
app.add_typer(files.app)
app.add_typer(ops.app)
app.add_typer(partitions.app, name="partitions")


def main() -> None:
    """Console entry point: one line on stderr and exit 1 for any error of ours."""
    try:
        app()
    except OrderbookStoreError as exc:
        typer.echo(f"orderbook-store: {exc}", err=True)
        sys.exit(1)
