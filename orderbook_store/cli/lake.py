"""``orderbook-store archive`` and ``restore``: closed partitions to the lake, and back.

Both need a lake (``LAKE_URL``, a directory or ``s3://bucket/prefix``, with ``LAKE_*`` for an
S3-compatible store) and do their work through ``ops.archive`` and ``ops.restore``. The lake's
secret key is never printed: lines name the lake by its URL only.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated

import typer
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.cli.common import run_with_engine
from orderbook_store.cli.files import EndOption, StartOption
from orderbook_store.cli.partitions import _age_option
from orderbook_store.errors import ConfigError
from orderbook_store.files.lake_store import Lake, open_lake
from orderbook_store.ops import archive as archiving
from orderbook_store.ops import restore as restoring
from orderbook_store.settings import Settings
from orderbook_store.times import from_us

app = typer.Typer()

NO_LAKE = (
    "{command} needs a lake: set LAKE_URL to a directory or s3://bucket/prefix "
    "(with LAKE_ENDPOINT_URL, LAKE_ACCESS_KEY_ID and LAKE_SECRET_ACCESS_KEY for S3-compatible "
    "storage other than AWS)"
)


def configured_lake(command: str) -> Lake:
    """The lake ``LAKE_URL`` names, or ``ConfigError`` saying how to configure one."""
    lake = open_lake(Settings())
    if lake is None:
        raise ConfigError(NO_LAKE.format(command=command))
    return lake


@app.command("archive")
def archive_command(
    older_than: Annotated[
        dt.timedelta,
        typer.Option(
            "--older-than",
            help="Age of the closed partitions to archive: 90d, 12w, 36h.",
            parser=_age_option,
            metavar="AGE",
        ),
    ],
    json_output: Annotated[
        bool, typer.Option("--json", help="The summary as JSON on stdout; progress on stderr.")
    ] = False,
) -> None:
    """Copy closed partitions older than --older-than to the lake (LAKE_URL).

    Each file is read back and checked (rows and checksum) against the
    partition, then the partition's range is recorded in the lake's catalog.
    Idempotent and resumable: an archived range is skipped, an interrupted
    run records nothing and is simply run again. Rows stay in PostgreSQL
    until `partitions prune`.
    """
    lake = configured_lake("archive")

    def say(line: str) -> None:
        typer.echo(line, err=json_output)

    result = run_with_engine(
        lambda engine: archiving.archive(engine, lake, older_than, progress=say)
    )
    if json_output:
        typer.echo(json.dumps(result.as_dict()))
        return
    typer.echo(
        f"{len(result.archived)} partitions archived to {lake.url}, {result.rows:,} rows; "
        f"{len(result.already_archived)} archived already"
    )


@app.command("restore")
def restore_command(
    start: StartOption,
    end: EndOption,
    symbol: Annotated[str | None, typer.Option(help="Only this symbol, e.g. BTCUSDT.")] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="The summary as JSON on stdout; progress on stderr.")
    ] = False,
) -> None:
    """Bring archived quotes of a range back from the lake into PostgreSQL, exactly.

    Every column comes back as archived (ids too). Quotes already stored
    are skipped, so a second restore adds nothing. Partitions for the range
    are made first. Days that prune dropped come back whole (a UTC day at
    a time).
    """
    if end <= start:
        raise ConfigError(
            f"--end ({from_us(end).isoformat()}) must be after --start "
            f"({from_us(start).isoformat()})"
        )
    lake = configured_lake("restore")

    def say(line: str) -> None:
        typer.echo(line, err=json_output)

    async def run(engine: AsyncEngine) -> restoring.RestoreResult:
        return await restoring.restore(engine, lake, start, end, symbol, progress=say)

    result = run_with_engine(run)
    if json_output:
        typer.echo(json.dumps(result.as_dict()))
        return
    typer.echo(
        f"restored {result.rows_added:,} rows from {len(result.files)} files "
        f"({result.rows_skipped:,} were stored already)"
    )
