"""``orderbook-store import | verify | export``: move files in and out of the database.

Exit codes: ``import`` 0 when every file was imported or already was, 3 when lines were
quarantined (the rest imported), 1 when a file was refused or failed; ``verify`` 0 when every
file matches the database, 3 when the database holds every row of the files and more in their
ranges (overlap), 1 when rows are missing; ``export`` 0.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.cli.common import run_with_engine, text_console
from orderbook_store.errors import ConfigError
from orderbook_store.files.export import export_parquet
from orderbook_store.files.importers import (
    FileResult,
    ImportOptions,
    ImportSummary,
    import_paths,
    known_formats,
)
from orderbook_store.files.importers.verify import Stats, VerifySummary, verify_paths
from orderbook_store.files.lake_store import Lake, open_lake
from orderbook_store.quote_checks import MAX_TIMESTAMP_US, MIN_TIMESTAMP_US
from orderbook_store.settings import Settings
from orderbook_store.times import from_us, iso_us

app = typer.Typer()


Paths = Annotated[
    list[Path],
    typer.Argument(
        help="Files or directories (walked recursively); plain, .gz or .zip.",
        exists=True,
        readable=True,
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no table.")]
JsonFlag = Annotated[
    bool,
    typer.Option("--json", help="One JSON object on stdout, for machines (no progress, no table)."),
]
Symbol = Annotated[
    str | None,
    typer.Option(help="Symbol for Binance bookTicker CSV files whose name does not carry it."),
]


def parse_time_us(value: str, option: str = "time") -> int:
    """``2024-01-01``, ``2024-01-01T12:00``, ISO with offset (UTC when none) or integer µs;
    ``ConfigError`` naming ``option`` and the value otherwise."""
    text = value.strip()
    parsed = int(text) if text.isascii() and text.isdigit() else iso_us(text)
    if parsed is None:
        raise ConfigError(
            f"{option}={value!r}: expected an ISO date or time such as 2024-01-01 or "
            "2024-01-01T12:00:00Z, or integer microseconds since the epoch"
        )
    if not MIN_TIMESTAMP_US <= parsed <= MAX_TIMESTAMP_US:
        raise ConfigError(
            f"{option}={value!r}: quotes are stored from 2010-01-01 to 2100-01-01 (UTC) only"
        )
    return parsed


def _time_option(option: str) -> Callable[[str], int]:
    """A Typer parser: a bad time is a usage error naming ``option``, before connecting."""

    def parse(value: str) -> int:
        try:
            return parse_time_us(value, option)
        except ConfigError as exc:
            raise typer.BadParameter(str(exc)) from None

    return parse


#: ``--start`` and ``--end`` of a command over a time range (``export``, ``restore``).
StartOption = Annotated[
    int,
    typer.Option(
        help="From (inclusive): ISO date/time, UTC, or µs.",
        parser=_time_option("--start"),
        metavar="TIME",
    ),
]
EndOption = Annotated[
    int,
    typer.Option(
        help="To (exclusive): ISO date/time, UTC, or µs.",
        parser=_time_option("--end"),
        metavar="TIME",
    ),
]


def _iso(timestamp_us: int | None) -> str:
    if timestamp_us is None:
        return ""
    moment = dt.datetime.fromtimestamp(timestamp_us // 1_000_000, tz=dt.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


class _Bar:
    """A rich progress bar: files done of total, rows, rows/s, elapsed. File names are shown
    as text (a name like ``q[/x].csv`` is not markup)."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}", markup=False, style="bold"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("files  {task.fields[rows]:,} rows  {task.fields[rate]:,.0f} rows/s"),
            TimeElapsedColumn(),
            console=console,
            transient=True,  # the table follows; a failure leaves only its one line
        )
        self.task = self.progress.add_task("import", total=None, rows=0, rate=0.0)
        self.rows = 0
        self.started = time.perf_counter()

    def file_started(self, file: str, index: int, total: int) -> None:
        name = Path(file.split("!")[-1]).name
        self.progress.update(self.task, total=total, completed=index, description=name[:40])

    def rows_done(self, rows: int) -> None:
        self.rows += rows
        rate = self.rows / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, rows=self.rows, rate=rate)

    def file_done(self, result: FileResult) -> None:
        self.progress.advance(self.task)


def _import_table(summary: ImportSummary) -> Table:
    table = Table(title="import")
    counts = ("rows", "already stored", "quarantined")
    for column in ("file", "format", "status", *counts, "first", "last"):
        table.add_column(column, justify="right" if column in counts else "left")
    for result in summary.files:
        table.add_row(
            result.file,
            result.format,
            result.status,
            f"{result.rows:,}",
            f"{result.duplicates:,}",
            f"{result.quarantined:,}",
            _iso(result.first_timestamp),
            _iso(result.last_timestamp),
        )
    rate = (summary.rows + summary.duplicates) / summary.seconds if summary.seconds else 0.0
    table.caption = (
        f"{summary.count('imported')} imported, {summary.count('skipped')} already imported, "
        f"{summary.count('refused') + summary.count('failed')} not imported; "
        f"{summary.rows:,} rows stored, {summary.duplicates:,} skipped as already stored "
        f"({rate:,.0f} rows/s), {summary.quarantined:,} quarantined"
    )
    return table


IMPORT_HELP = (
    "Import quote files, each exactly once; the format is read from the content.\n\n"
    "Formats: tardis.dev quotes and book_snapshot_N CSV, FileStorage daily files, Binance "
    "bookTicker CSV dumps (ms; symbol from <SYMBOL>-bookTicker-<date> or --symbol), JSON lines "
    "of bookTicker websocket messages, Parquet trees written by `export`; plain, .gz or .zip.\n\n"
    "Rerunning is safe: imported files (and copies of them) are skipped, an interrupted file is "
    "imported whole. Quotes already stored (same exchange, symbol, both timestamps and four "
    "values: the writer's, another file's) are skipped and counted, unless --allow-duplicates; "
    "a quote a file repeats is stored as often as the file has it. Lines that fail validation "
    "go to the quarantine CSV (file, line, reason, text).\n\n"
    "Exit code: 0 all imported or already there; 3 some lines quarantined; 1 a file refused."
)
VERIFY_HELP = (
    "Compare files with the database, per exchange and symbol: row count, first and last "
    "timestamp, and a checksum of every value. Where they differ, rows are compared one by one: "
    "OVERLAP when every row of the file is stored and the database holds more in that range "
    "(another source's rows, or extra copies of the file's quotes), MISMATCH when rows of the "
    "file are missing.\n\n"
    "Exit code: 0 every file matches; 3 overlap, nothing missing; 1 rows missing or a file "
    "unreadable."
)
EXPORT_HELP = (
    "Export one symbol's quotes in [START, END) in the lake format (docs/lake-format.md) "
    "under OUT/exchange=../symbol=../date=YYYY-MM-DD/, or, without --out, into the lake "
    "LAKE_URL names (a directory or s3://bucket/prefix).\n\n"
    "Times are timestamp\\[us, UTC], values decimal128(20,8), exact, with id and created_at; "
    "`import` reads a local tree back. Exporting the same range again replaces its files, an "
    "adjacent range adds files, a range partly overlapping files already there is refused."
)


@app.command("import", help=IMPORT_HELP)
def import_files(
    paths: Paths,
    quarantine: Annotated[
        Path | None,
        typer.Option(help="CSV for rejected lines (default quarantine-<UTC time>.csv here)."),
    ] = None,
    symbol: Symbol = None,
    allow_duplicates: Annotated[
        bool,
        typer.Option(
            "--allow-duplicates",
            help="Store every valid row, also quotes the table already holds (no partition locks).",
        ),
    ] = False,
    quiet: Quiet = False,
    json_output: JsonFlag = False,
) -> None:
    """Import quote files (format detected from content), each exactly once.

    Formats: tardis.dev quotes and book_snapshot_N CSV, Binance bookTicker CSV dumps and
    websocket JSON lines, FileStorage daily files, Parquet from `export`. Rerunning is safe:
    files already imported are skipped, an interrupted file is imported whole.
    """
    if quarantine is not None and not quarantine.parent.is_dir():
        raise ConfigError(
            f"--quarantine={str(quarantine)!r}: the directory {str(quarantine.parent)!r} "
            "does not exist; create it or name a file in an existing one"
        )
    console = Console(stderr=True)
    # A bar only for a terminal: in a log or a pipe it is noise.
    bar = None if quiet or json_output or not console.is_terminal else _Bar(console)

    def run() -> ImportSummary:
        return run_with_engine(
            lambda engine: import_paths(
                engine,
                paths,
                options=ImportOptions(symbol=symbol),
                quarantine=quarantine,
                progress=bar,
                allow_duplicates=allow_duplicates,
            )
        )

    if bar is not None:
        with bar.progress:
            summary = run()
    else:
        summary = run()
    if json_output:
        typer.echo(json.dumps(_import_json(summary)))
    elif not quiet:
        text_console().print(_import_table(summary))
    for result in summary.files:
        if result.status in ("refused", "failed"):
            typer.echo(f"{result.status}: {result.message}", err=True)
    if any("unknown format" in result.message for result in summary.files):
        typer.echo(f"known formats:\n{known_formats()}", err=True)
    if summary.quarantine_path is not None:
        typer.echo(
            f"{summary.quarantined:,} lines quarantined in {summary.quarantine_path}", err=True
        )
    raise typer.Exit(summary.exit_code)


def _import_json(summary: ImportSummary) -> dict[str, object]:
    return {
        "exit_code": summary.exit_code,
        "imported": summary.count("imported"),
        "skipped": summary.count("skipped"),
        "refused": summary.count("refused"),
        "failed": summary.count("failed"),
        "rows": summary.rows,
        "duplicates": summary.duplicates,
        "quarantined": summary.quarantined,
        "quarantine_file": str(summary.quarantine_path) if summary.quarantine_path else None,
        "seconds": round(summary.seconds, 3),
        "files": [
            {
                "file": result.file,
                "format": result.format,
                "status": result.status,
                "rows": result.rows,
                "duplicates": result.duplicates,
                "quarantined": result.quarantined,
                "first_timestamp_us": result.first_timestamp,
                "last_timestamp_us": result.last_timestamp,
                "message": result.message,
            }
            for result in summary.files
        ],
    }


def _verify_table(summary: VerifySummary) -> Table:
    table = Table(title="verify")
    for column in (
        "file",
        "exchange/symbol",
        "status",
        "rows file/db",
        "missing",
        "extra (copies)",
        "first",
        "last",
        "checksum",
    ):
        table.add_column(column)
    for check in summary.files:
        if not check.groups:
            table.add_row(check.file, "", check.status, "", "", "", "", "", "")
        for group in check.groups:
            f, d = group.file, group.database
            table.add_row(
                check.file,
                f"{group.exchange}/{group.symbol}",
                group.status if group.ok else group.status.upper(),
                f"{f.rows:,}/{d.rows:,}",
                f"{group.missing:,}",
                f"{group.extra:,} ({group.extra_copies:,})",
                "=" if f.first == d.first else f"{_iso(f.first)} / {_iso(d.first)}",
                "=" if f.last == d.last else f"{_iso(f.last)} / {_iso(d.last)}",
                "=" if f.checksum == d.checksum else "differs",
            )
    return table


@app.command("verify", help=VERIFY_HELP)
def verify_files(
    paths: Paths, symbol: Symbol = None, quiet: Quiet = False, json_output: JsonFlag = False
) -> None:
    """Compare files with the database: row count, first/last timestamp, value checksum.

    Exit code 0 when every file matches, 3 when files overlap other rows but none is missing,
    1 when rows are missing (or a file cannot be read).
    """
    summary = run_with_engine(
        lambda engine: verify_paths(engine, paths, options=ImportOptions(symbol=symbol))
    )
    if json_output:
        typer.echo(json.dumps(_verify_json(summary)))
    elif not quiet:
        text_console().print(_verify_table(summary))
    for check in summary.files:
        if check.status == "refused":
            typer.echo(f"refused: {check.message}", err=True)
        elif check.status in ("mismatch", "overlap") and quiet:
            typer.echo(f"{check.status}: {check.file}", err=True)
    raise typer.Exit(summary.exit_code)


def _stats_json(stats: Stats) -> dict[str, object]:
    return {
        "rows": stats.rows,
        "first_timestamp_us": stats.first,
        "last_timestamp_us": stats.last,
        "checksum": str(stats.checksum),  # may pass 2**53: text keeps every digit
    }


def _verify_json(summary: VerifySummary) -> dict[str, object]:
    return {
        "ok": summary.exit_code == 0,
        "files": [
            {
                "file": check.file,
                "format": check.format,
                "status": check.status,
                "message": check.message,
                "groups": [
                    {
                        "exchange": group.exchange,
                        "symbol": group.symbol,
                        "ok": group.ok,
                        "status": group.status,
                        "missing": group.missing,
                        "extra": group.extra,
                        "extra_copies": group.extra_copies,
                        "file": _stats_json(group.file),
                        "database": _stats_json(group.database),
                    }
                    for group in check.groups
                ],
            }
            for check in summary.files
        ],
    }


def _configured_lake() -> Lake:
    """The lake ``LAKE_URL`` names, for an export without ``--out``."""
    lake = open_lake(Settings())
    if lake is None:
        raise ConfigError("export: give --out DIR, or set LAKE_URL to export into the lake")
    return lake


@app.command("export", help=EXPORT_HELP)
def export_files(
    symbol: Annotated[str, typer.Option(help="Symbol to export, e.g. BTCUSDT.")],
    start: StartOption,
    end: EndOption,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output directory (hive-partitioned tree); default: the lake LAKE_URL names.",
            file_okay=False,
        ),
    ] = None,
    quiet: Quiet = False,
    json_output: JsonFlag = False,
) -> None:
    """Export a symbol's quotes in the lake format, into --out or the configured lake.

    Timestamps are timestamp[us, UTC], values decimal128(20,8) (exact); `import` reads a
    local tree back.
    """
    start_us, end_us = start, end
    if end_us <= start_us:
        raise ConfigError(
            f"--end ({from_us(end_us).isoformat()}) must be after --start "
            f"({from_us(start_us).isoformat()})"
        )
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]export"),
        TextColumn("{task.completed:,.0f} rows"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet or json_output or not console.is_terminal,
        transient=True,
    )
    target: Path | Lake = out if out is not None else _configured_lake()
    where = target.url if isinstance(target, Lake) else str(target)
    task = progress.add_task("export", total=None)

    async def run(engine: AsyncEngine) -> None:
        summary = await export_parquet(
            engine,
            symbol=symbol,
            start_us=start_us,
            end_us=end_us,
            out=target,
            on_rows=lambda rows: progress.advance(task, rows),
        )
        progress.stop()
        if json_output:
            document = {
                "rows": summary.rows,
                "files": summary.files,
                "seconds": round(summary.seconds, 3),
            }
            typer.echo(json.dumps(document))
        elif not quiet:
            rate = summary.rows / summary.seconds if summary.seconds else 0.0
            text_console().print(
                f"exported {summary.rows:,} rows into {len(summary.files)} files under {where} "
                f"({rate:,.0f} rows/s)"
            )

    with progress:
        run_with_engine(run)
