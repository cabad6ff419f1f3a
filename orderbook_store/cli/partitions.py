"""``orderbook-store partitions ...``: keep partitions ahead, list, compact and prune them.

Each command reads the same ``Settings`` as the library (``DB_*``, ``.env``, ``DATABASE_URL``)
and does its work through ``orderbook_store.ops.partitions``.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.table import Table

from orderbook_store.cli.common import run_with_engine, text_console
from orderbook_store.errors import ConfigError
from orderbook_store.ops import compaction, partitions
from orderbook_store.quote_checks import MAX_TIMESTAMP_US, MIN_TIMESTAMP_US
from orderbook_store.settings import Settings
from orderbook_store.times import day_start_us, parse_age, parse_day

app = typer.Typer(
    help="Manage orderbook_data's date partitions: ensure, list, compact, prune.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")

_ADJECTIVE = {"day": "daily", "week": "weekly", "month": "monthly"}


def _size(size_bytes: int) -> str:
    value = float(size_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"  # pragma: no cover


def _day(moment: dt.datetime | None) -> str:
    if moment is None:
        return "-"
    if moment.time() == dt.time(0):
        return moment.date().isoformat()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _since_option(value: str) -> dt.date:
    """``--since``: a date quotes can have; a usage error naming it otherwise."""
    try:
        day = parse_day(value, "--since")
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    if not MIN_TIMESTAMP_US <= day_start_us(day) < MAX_TIMESTAMP_US:
        raise typer.BadParameter(
            f"--since={value!r}: quotes are stored from 2010-01-01 to 2099-12-31 only"
        )
    return day


def _period_option(value: str) -> str:
    if value not in partitions.PERIODS:
        raise typer.BadParameter(
            f"--period={value!r}: must be one of {', '.join(partitions.PERIODS)}"
        )
    return value


#: ``--period`` of ``ensure`` and ``compact``.
PeriodOption = Annotated[
    str | None,
    typer.Option(
        help="day, week or month (default: the period the table already uses).",
        parser=_period_option,
    ),
]


def _age_option(value: str) -> dt.timedelta:
    try:
        return parse_age(value, "--older-than")
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


JsonFlag = Annotated[bool, typer.Option("--json", help="One JSON object on stdout, for machines.")]


@app.command()
def ensure(
    ahead: Annotated[
        int,
        typer.Option(
            help="Periods after the current one that must have a partition.", min=0, max=1000
        ),
    ] = 7,
    period: PeriodOption = None,
    since: Annotated[
        dt.date | None,
        typer.Option(
            help="Also every period from this date (YYYY-MM-DD) on: run before importing old data.",
            parser=_since_option,
            metavar="YYYY-MM-DD",
        ),
    ] = None,
    lock_timeout: Annotated[
        float | None,
        typer.Option(
            help="Give up after waiting this many seconds for the table lock.",
            min=0.001,
            max=2_147_483.0,
        ),
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Create the next partitions and move rows out of the default partition (idempotent)."""
    result = run_with_engine(
        lambda engine: partitions.ensure(
            engine, ahead, period=period, since=since, lock_timeout_s=lock_timeout
        )
    )
    if json_output:
        document = {
            "period": result.period,
            "ahead": ahead,
            "since": since.isoformat() if since else None,
            "created": result.created,
            "moved_rows": result.moved_rows,
        }
        typer.echo(json.dumps(document))
        return
    for name in result.created:
        typer.echo(f"created {name}")
    if result.moved_rows:
        typer.echo(f"moved {result.moved_rows} rows out of {partitions.DEFAULT_PARTITION}")
    typer.echo(
        f"partitions ready ({_ADJECTIVE[result.period]}, {ahead} ahead"
        + (f", since {since.isoformat()}" if since else "")
        + f"): {len(result.created)} created, {result.moved_rows} rows moved"
    )


@app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Show every partition: name, date range, estimated rows, size on disk, when compacted."""
    found = run_with_engine(partitions.list_partitions)
    if as_json:
        for part in found:
            typer.echo(
                json.dumps(
                    {
                        "name": part.name,
                        "start": part.start.isoformat() if part.start else None,
                        "end": part.end.isoformat() if part.end else None,
                        "start_us": part.start_us,
                        "end_us": part.end_us,
                        "estimated_rows": part.estimated_rows,
                        "size_bytes": part.size_bytes,
                        "compacted_at": (
                            part.compacted_at.isoformat() if part.compacted_at else None
                        ),
                    }
                )
            )
        return
    table = Table()  # names and sizes from the server: printed as text, never markup
    table.add_column("partition", no_wrap=True)
    table.add_column("from (UTC)", no_wrap=True)
    table.add_column("to (UTC, excl.)", no_wrap=True)
    table.add_column("rows (est.)", justify="right")
    table.add_column("size", justify="right")
    table.add_column("compacted (UTC)", no_wrap=True)
    for part in found:
        rows = "-" if part.estimated_rows is None else f"{part.estimated_rows:,}"
        table.add_row(
            part.name,
            "default" if part.is_default else _day(part.start),
            "" if part.is_default else _day(part.end),
            rows,
            _size(part.size_bytes),
            "-" if part.compacted_at is None else f"{part.compacted_at:%Y-%m-%d %H:%M}",
        )
    text_console().print(table)


@app.command()
def compact(
    period: PeriodOption = None,
    lock_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds each attempt waits for the table lock before retrying.",
            min=0.001,
            max=60.0,
        ),
    ] = 0.2,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only say what would be done.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="The summary as JSON on stdout; progress on stderr.")
    ] = False,
) -> None:
    """Rewrite closed partitions in (symbol, timestamp, id) order, one per period.

    Closed: the whole range is in the past. The historical partition of an adopted table is
    split into one partition per period. Writers and readers carry on; each swap locks the
    table for milliseconds. Idempotent and resumable: run it daily, after ensure.
    """
    if Settings().behind_pgbouncer:
        raise partitions.PartitionError(
            "compact holds a session of its own (a session lock): connect to the server "
            "directly (DigitalOcean's port 25060), not through PgBouncer"
        )
    if dry_run:
        for part in run_with_engine(compaction.compactable):
            typer.echo(f"would compact {part.name} ({_day(part.start)} .. {_day(part.end)})")
        return

    def say(line: str) -> None:
        typer.echo(line, err=as_json)

    result = run_with_engine(
        lambda engine: compaction.compact(
            engine, period=period, lock_timeout_s=lock_timeout, progress=say
        )
    )
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
        return
    made = sum(len(c.partitions) for c in result.compacted)
    late = sum(c.late_rows for c in result.compacted)
    typer.echo(
        f"{len(result.compacted)} partitions compacted into {made}, {result.rows:,} rows "
        f"({late:,} arrived meanwhile); longest lock {result.longest_lock_s * 1000:.0f} ms; "
        f"{result.already_compacted} already compacted"
    )


@app.command()
def prune(
    older_than: Annotated[
        dt.timedelta,
        typer.Option(
            "--older-than",
            help="Age of the partitions to drop: 90d, 12w, 36h.",
            parser=_age_option,
            metavar="AGE",
        ),
    ],
    archive: Annotated[
        Path | None,
        typer.Option(
            help="Without LAKE_URL: this directory is the lake (archived, checked, then dropped).",
            file_okay=False,
        ),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Drop without an archive: the rows are gone for good.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Drop partitions wholly older than --older-than once the lake holds them.

    With a lake (LAKE_URL, or --archive DIR without one) each partition is archived first if
    it is not yet (see `orderbook-store archive`), checked against its archive, dropped, and
    marked dropped in the lake's catalog: reads then take its range from the lake. Without
    one, --yes drops the rows for good.
    """
    from orderbook_store.files.lake_store import open_lake

    age = older_than
    lake = open_lake(Settings())
    if lake is not None and archive is not None:
        raise ConfigError(
            f"--archive={str(archive)!r}: LAKE_URL is set, so prune archives to that lake; "
            "leave out --archive (or unset LAKE_URL to archive to a directory)"
        )
    if dry_run:
        found = run_with_engine(lambda engine: partitions.prunable(engine, age))
        if json_output:
            names = [part.name for part in found]
            typer.echo(json.dumps({"dry_run": True, "dropped": names, "rows": None}))
            return
        for part in found:
            typer.echo(f"would drop {part.name} ({_day(part.start)} .. {_day(part.end)})")
        return
    if lake is None and archive is None and not yes:
        typer.echo(
            "orderbook-store: prune without a lake deletes rows for good; "
            "set LAKE_URL, pass --archive DIR or --yes",
            err=True,
        )
        raise typer.Exit(2)
    say = (lambda line: typer.echo(line, err=True)) if json_output else typer.echo
    result = run_with_engine(
        lambda engine: partitions.prune(engine, age, archive, lake=lake, confirm=yes, progress=say)
    )
    if json_output:
        document = {
            "dry_run": False,
            "dropped": result.dropped,
            "rows": result.rows,
            "files": result.files,
        }
        typer.echo(json.dumps(document))
        return
    typer.echo(f"{len(result.dropped)} partitions dropped, {result.rows} rows")
