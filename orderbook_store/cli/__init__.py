"""``orderbook-store``: operations on the quote store from the shell.

Every command reads the same ``Settings`` as the library (``DB_*``, ``.env``, ``DATABASE_URL``).
A failure prints one line naming the problem and the fix and exits non-zero (``root`` and
``failures``; ``--debug`` adds the traceback); no secret reaches the output, and text from the
server, files or settings is printed as text, never as markup. The commands live in
``migrate`` (upgrade, stamp, current), ``files`` (import, verify, export), ``lake`` (archive,
restore), ``ops`` (doctor, roles, dead-letters) and ``partitions`` (the ``partitions`` group);
``common`` gives each command its engine and its console.
"""

from __future__ import annotations

from typing import Annotated

import typer

from orderbook_store.cli import files, lake, migrate, ops, partitions
from orderbook_store.cli.root import PROGRAM, RootGroup, package_version

app = typer.Typer(
    cls=RootGroup,
    help="Store and read best bid/ask quotes in PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"{PROGRAM} {package_version()}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[
        bool, typer.Option("--debug", help="On a failure, print the traceback too.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Store and read best bid/ask quotes in PostgreSQL."""


# One style: each module holds a Typer app of its commands; partitions is a command group.
app.add_typer(migrate.app)
app.add_typer(files.app)
app.add_typer(ops.app)
app.add_typer(lake.app)
app.add_typer(partitions.app, name="partitions")


def main() -> None:
    """Console entry point (``orderbook-store``, ``python -m orderbook_store``)."""
    app(prog_name=PROGRAM)
