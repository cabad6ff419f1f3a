"""Operator commands: ``orderbook-store doctor``, ``roles --print-sql`` and ``dead-letters``.

They read the same ``Settings`` as the library and never print the password.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from orderbook_store.cli.common import text_console
from orderbook_store.ops.doctor import Report
from orderbook_store.ops.doctor import run as run_doctor
from orderbook_store.ops.roles import RoleNames, roles_sql
from orderbook_store.settings import Settings

app = typer.Typer()


_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "info": "cyan"}

JsonFlag = Annotated[bool, typer.Option("--json", help="One JSON object on stdout, for machines.")]
PrintSql = Annotated[
    bool, typer.Option("--print-sql", help="Print the idempotent SQL script (run it with psql).")
]
OwnerName = Annotated[str, typer.Option(help="Role that owns the tables and runs migrations.")]
WriterName = Annotated[str, typer.Option(help="Role the collectors write as.")]
ReaderName = Annotated[str, typer.Option(help="Role for read-only access.")]
SchemaName = Annotated[str, typer.Option(help="Schema holding the tables.")]


@app.command()
def doctor(json_output: JsonFlag = False) -> None:
    """Check connectivity, TLS, server settings, migrations, table, spool and clock.

    Exits 1 when any check fails (a warning alone exits 0).
    """
    report = run_doctor(Settings())
    if json_output:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_table(report)
    if not report.ok:
        raise typer.Exit(1)


def _print_table(report: Report) -> None:
    from rich.table import Table
    from rich.text import Text

    # Values come from the server, the settings and the file system (a database named
    # 'q[/x]'): they are Text, never read as markup; only the status carries a style.
    table = Table(title=Text(f"orderbook-store doctor: {report.target}"), title_justify="left")
    table.add_column("check")
    table.add_column("status")
    table.add_column("value")
    table.add_column("detail", overflow="fold")
    for check in report.checks:
        table.add_row(
            Text(check.name),
            Text(check.status, style=_STYLE[check.status]),
            Text(check.value),
            Text(check.detail),
        )
    console = text_console()
    console.print(table)
    verdict = "all good" if report.ok else "something is wrong (see the failed checks)"
    console.print(Text(verdict, style="" if report.ok else "bold red"))


@app.command()
def roles(
    print_sql: PrintSql = False,
    owner: OwnerName = "orderbook_owner",
    writer: WriterName = "orderbook_writer",
    reader: ReaderName = "orderbook_reader",
    schema: SchemaName = "public",
) -> None:
    """SQL creating a migration owner, a writer (INSERT only) and a reader (SELECT only)."""
    if not print_sql:
        typer.echo(
            "nothing done: `orderbook-store roles --print-sql | psql ...` prints the script "
            "for an administrator to run",
            err=True,
        )
        raise typer.Exit(2)
    typer.echo(roles_sql(RoleNames(owner=owner, writer=writer, reader=reader), schema), nl=False)


@app.command("dead-letters")
def dead_letters(json_output: JsonFlag = False) -> None:
    """List the rows the server refused (a constraint, the encoding...), with its reasons.

    Writers keep them in ``dead-letters.jsonl`` beside the spool of the configured database;
    each line there is one JSON object. Exits 0 whether or not there are any.
    """
    from orderbook_store.ops.doctor import dead_letter_file
    from orderbook_store.write import dead_letters as letters_file

    path = dead_letter_file(Settings())
    letters = letters_file.read(path)
    if json_output:
        typer.echo(json.dumps([asdict(letter) for letter in letters], indent=2))
        return
    from rich.table import Table
    from rich.text import Text

    console = text_console()
    if letters:
        table = Table(title_justify="left")
        for column in ("time", "sqlstate", "reason", "symbol", "timestamp"):
            table.add_column(column, overflow="fold")
        for letter in letters:  # server and quote text as Text: never read as markup
            cells = (
                letter.time,
                letter.sqlstate or "",
                letter.reason,
                str(letter.row.get("symbol")),
                str(letter.row.get("timestamp")),
            )
            table.add_row(*(Text(cell) for cell in cells))
        console.print(table)
    console.print(f"{len(letters)} refused row(s) in {path}")
