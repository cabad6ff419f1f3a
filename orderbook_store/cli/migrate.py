"""``orderbook-store upgrade``, ``stamp`` and ``current``: the schema, through Alembic, with the
library's settings."""

from __future__ import annotations

import json
import re
from typing import Annotated

import typer

from orderbook_store.cli.failures import server_words
from orderbook_store.errors import ConfigError
from orderbook_store.ops import migrations
from orderbook_store.settings import Settings
from orderbook_store.write.failures import sqlstate_of

app = typer.Typer()

Revision = Annotated[str, typer.Argument(help="Target revision.")]
JsonFlag = Annotated[
    bool, typer.Option("--json", help="One JSON object on stdout: the revision before and after.")
]
Force = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Record REVISION even when it is older than the database's (the schema stays).",
    ),
]

_PLAIN_REVISION = re.compile(r"[A-Za-z0-9_]+")


def _report(verb: str, before: str | None, after: str | None, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"previous": before, "revision": after}))
    elif before == after:
        typer.echo(f"database already at {after or 'base'}")
    else:
        typer.echo(f"database {verb} {after or 'base'} (was {before or 'not migrated'})")


@app.command()
def upgrade(revision: Revision = "head", json_output: JsonFlag = False) -> None:
    """Bring the schema up to REVISION (default: head), like `alembic upgrade head`."""
    settings = Settings()
    target = None
    if _PLAIN_REVISION.fullmatch(revision):
        target = migrations.check_revision(revision, settings)  # unknown: before connecting
    before = migrations.database_revision(settings)
    known = migrations.known_revisions()
    if target in known and before in known and known.index(target) < known.index(before):
        raise ConfigError(
            f"the database is at {before}, past {target}: upgrade never goes back "
            f"(`alembic downgrade {target}` does)"
        )
    try:
        migrations.upgrade(settings, revision)
    except Exception as exc:
        mismatch = _schema_mismatch(exc, before)
        if mismatch is None:
            raise
        raise mismatch from exc
    _report("upgraded to", before, migrations.database_revision(settings), json_output)


def _schema_mismatch(exc: BaseException, before: str | None) -> ConfigError | None:
    """A migration the server refused for what the schema holds or lacks: the recorded
    revision is not the schema's (a stamp too old or too new), which no retry fixes."""
    state = sqlstate_of(exc)
    if state is None or state == "42501" or state[:2] not in ("42", "0A"):
        return None
    return ConfigError(
        f"upgrade from {before or 'an unmigrated database'} failed: {server_words(exc)}; "
        "the schema does not match the revision recorded for it (stamped at another one?): "
        "`orderbook-store doctor` shows where it stands, and `orderbook-store stamp REVISION "
        "--force` records the revision it really has"
    )


@app.command()
def stamp(revision: Revision = "0001", force: Force = False, json_output: JsonFlag = False) -> None:
    """Adopt a database made by hand from the original DDL: record it as being at REVISION.

    Only records the revision; the schema is left as it is. Refuses to record an older
    revision than the database's without --force.
    """
    settings = Settings()
    before = migrations.database_revision(settings)
    migrations.stamp(settings, revision, force=force)
    _report("stamped at", before, migrations.database_revision(settings), json_output)


@app.command()
def current(json_output: JsonFlag = False) -> None:
    """Show the revision the database is at, and the newest one this package knows."""
    at = migrations.database_revision(Settings())
    head = migrations.head_revision()
    if json_output:
        typer.echo(json.dumps({"revision": at, "head": head, "at_head": at == head}))
    elif at == head:
        typer.echo(f"database at {at} (head)")
    elif at is None:
        typer.echo(f"database not migrated (head is {head}): run `orderbook-store upgrade`")
    else:
        typer.echo(f"database at {at}, head is {head}: run `orderbook-store upgrade`")
