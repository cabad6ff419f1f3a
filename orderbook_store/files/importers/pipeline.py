"""Files into ``orderbook_data`` through ``COPY``: streamed, exactly once per file, bad rows aside.

Per file, in one transaction: insert the file's ledger entry (``orderbook_import_files``, keyed
by the SHA-256 of its bytes and path context), ``COPY`` its valid rows, record their count and
time range in the entry, commit. Why the whole file in one transaction rather than chunks with
a resume offset: the ledger entry and the rows then become visible together or not at all, so
a run killed anywhere in a file leaves nothing of it, and the rerun imports it once, whole; no
offset bookkeeping can drift from what was committed. PostgreSQL holds a transaction of
millions of COPY rows without trouble (no lock escalation, WAL streams as it goes); the cost is
only that an interrupted file is read again from its start. The entry is inserted first, so a
second importer given the same file at the same time waits on its key and then skips it.
The decompressed content is hashed as it streams; its key is set on the entry last, and a
unique index on it rolls back a file whose content was imported before under another name or
compression (a ``.csv`` beside its ``.csv.gz``), so copies add nothing either.

Streaming: a worker thread reads, validates and encodes blocks of a few MB (Arrow kernels,
which release the GIL) while the event loop sends the previous block, with at most
:data:`PREFETCH_BLOCKS` blocks in flight, so memory is constant whatever the file's size and
the server's parsing overlaps the client's. Rows are sent as unquoted CSV (``COPY ... (FORMAT
csv)``), where an empty cell is NULL.

Rejected lines go to the quarantine CSV (``file,line,reason,text``) after the file's commit,
from a temporary spool, so a rerun after an interruption does not list them twice.

Quotes already stored (by the writer, another file, an earlier run) are skipped, block by
block, in the same transaction (:mod:`.dedupe`: the rule for repeated quotes, the locks, the
cost); a block of new data is copied in as above. ``allow_duplicates=True`` copies every row,
as the pipeline did before it skipped anything. The ledger's ``rows`` are the rows a file
added.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import hashlib
import re
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final, Protocol

import asyncpg
import pyarrow.compute as pc
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.files.importers.base import ImportOptions, Reader, RefusedFile
from orderbook_store.files.importers.dedupe import SkipStored
from orderbook_store.files.importers.detect import detect, expand
from orderbook_store.files.importers.rows import Checked, Rejected, copy_csv
from orderbook_store.files.importers.source import Digest, ImportUnit, identity_of, keyed
from orderbook_store.models import ImportedFile
from orderbook_store.pg.connection import copy_quotes_in, raw_connection

#: Encoded blocks waiting to be sent; with ~4 MB blocks this bounds memory at a few tens of MB.
PREFETCH_BLOCKS: Final = 2

#: Tries of one file when the server aborts its transaction to break a deadlock (two imports
#: locking the same partitions in another order, see :mod:`.dedupe`); nothing of it was kept.
DEADLOCK_ATTEMPTS: Final = 3

QUARANTINE_HEADER: Final = ("file", "line", "reason", "text")

_LEDGER = ImportedFile.__tablename__


@dataclass
class FileResult:
    """What happened to one file (or zip member)."""

    file: str
    format: str = ""
    status: str = "imported"  # imported | skipped | refused | failed
    rows: int = 0  # rows the file added to the table
    duplicates: int = 0  # valid rows not added: the table held these quotes already
    quarantined: int = 0
    first_timestamp: int | None = None
    last_timestamp: int | None = None
    seconds: float = 0.0
    message: str = ""


@dataclass
class ImportSummary:
    """A run's outcome. ``exit_code``: 0 all good, 3 rows quarantined, 1 a file not imported."""

    files: list[FileResult] = field(default_factory=list)
    quarantine_path: Path | None = None
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(result.rows for result in self.files)

    @property
    def duplicates(self) -> int:
        return sum(result.duplicates for result in self.files)

    @property
    def quarantined(self) -> int:
        return sum(result.quarantined for result in self.files)

    def count(self, status: str) -> int:
        return sum(1 for result in self.files if result.status == status)

    @property
    def exit_code(self) -> int:
        if self.count("refused") or self.count("failed"):
            return 1
        return 3 if self.quarantined else 0


class ImportProgress(Protocol):
    """Receives progress; the CLI draws a bar with it, scripts pass nothing."""

    def file_started(self, file: str, index: int, total: int) -> None: ...

    def rows_done(self, rows: int) -> None: ...

    def file_done(self, result: FileResult) -> None: ...


@dataclass
class _Piece:
    data: bytes
    rows: int
    first: int | None
    last: int | None
    rejected: list[Rejected]
    symbols: list[str]


def _encode(checked: Checked) -> _Piece:
    rows = checked.rows
    first = last = None
    symbols: list[str] = []
    if rows.num_rows:
        bounds = pc.min_max(rows.column("timestamp")).as_py()
        first, last = bounds["min"], bounds["max"]
        symbols = pc.unique(rows.column("symbol")).to_pylist()
    return _Piece(copy_csv(rows), rows.num_rows, first, last, checked.rejected, symbols)


def _next_piece(blocks: Iterator[Checked]) -> _Piece | None:
    for checked in blocks:
        return _encode(checked)
    return None


class _SameContent(Exception):
    """This file's content is already in the ledger under another file."""

    def __init__(self, content_key: str) -> None:
        super().__init__(content_key)
        self.content_key = content_key


class _Quarantine:
    """Rejected lines of the current file, spooled, appended to the CSV once it committed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.spool: IO[str] = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=1 << 20, mode="w+", encoding="utf-8", newline=""
        )
        self.writer = csv.writer(self.spool, lineterminator="\n")

    def add(self, file: str, rejected: Sequence[Rejected]) -> None:
        for entry in rejected:
            self.writer.writerow((file, entry.line, entry.reason, entry.text))

    def publish(self) -> None:
        if self.spool.tell() == 0:
            return
        self.spool.seek(0)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8", newline="") as out:
            if new:
                csv.writer(out, lineterminator="\n").writerow(QUARANTINE_HEADER)
            while chunk := self.spool.read(1 << 20):
                out.write(chunk)

    def close(self) -> None:
        self.spool.close()


async def _pieces(reader: Reader, digest: Digest) -> AsyncIterator[_Piece]:
    """The reader's blocks, encoded in a worker thread, at most PREFETCH_BLOCKS ahead."""
    queue: asyncio.Queue[_Piece | BaseException | None] = asyncio.Queue(PREFETCH_BLOCKS)
    blocks = reader.blocks(digest)

    async def produce() -> None:
        try:
            while (piece := await asyncio.to_thread(_next_piece, blocks)) is not None:
                await queue.put(piece)
            await queue.put(None)
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put(exc)

    task = asyncio.create_task(produce())
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(_close, blocks)


def _close(blocks: Iterator[Checked]) -> None:
    close = getattr(blocks, "close", None)
    if close is not None:
        close()


async def already_imported(engine: AsyncEngine, identity: str) -> bool:
    """Whether the ledger has an entry for this file identity."""
    async with engine.connect() as conn:
        found = await conn.scalar(
            text(f"SELECT 1 FROM {_LEDGER} WHERE file_sha256 = :key"), {"key": identity}
        )
    return found is not None


_DAILY_FILE = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})\.csv(?:\.gz)?")


def still_being_written(unit: ImportUnit, today: dt.date | None = None) -> str:
    """Why a ``FileStorage`` file of today (UTC) or later is not imported yet ("" if it may be).

    The collector appends to the day's file until the day ends; imported now, the file would
    change, and its earlier rows could not be told apart from the new ones later.
    """
    found = _DAILY_FILE.fullmatch(unit.name)
    if found is None:
        return ""
    try:
        day = dt.date.fromisoformat(found.group(1))
    except ValueError:
        return ""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    if day < today:
        return ""
    return (
        f"{unit.display}: a daily file of {day} (UTC), still being written; "
        "import it once the day is over"
    )


async def _changed_since_import(engine: AsyncEngine, unit: ImportUnit) -> str:
    """Why a file imported before under this path, with other bytes, is refused ("" if not).

    Importing it again would store the rows it had then a second time; the message says how
    to replace them instead.
    """
    async with engine.connect() as conn:
        earlier = (
            await conn.execute(
                text(f"SELECT imported_at, rows FROM {_LEDGER} WHERE path = :path"),
                {"path": unit.display},
            )
        ).first()
    if earlier is None:
        return ""
    return (
        f"{unit.display}: changed since it was imported on {earlier[0]:%Y-%m-%d %H:%M} UTC "
        f"({earlier[1]:,} rows); importing it again would store those rows twice. To replace "
        f"them, delete them and its entry in {_LEDGER}, then import it again"
    )


def _deadlocked(exc: BaseException) -> bool:
    """Whether the server aborted the transaction to break a deadlock (SQLSTATE 40P01)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, asyncpg.DeadlockDetectedError):
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


async def import_unit(
    engine: AsyncEngine,
    unit: ImportUnit,
    *,
    options: ImportOptions,
    quarantine: Path,
    progress: ImportProgress | None = None,
    allow_duplicates: bool = False,
) -> FileResult:
    """Import one file or zip member exactly once (see the module docstring).

    Quotes the table holds already are skipped (counted in ``duplicates``) unless
    ``allow_duplicates``.
    """
    started = time.perf_counter()
    result = FileResult(unit.display)
    try:
        reader = detect(unit, options)
    except RefusedFile as exc:
        result.status, result.message = "refused", str(exc)
        return result
    result.format = reader.format
    identity = await asyncio.to_thread(identity_of, unit, reader.format, reader.context)
    if await already_imported(engine, identity):
        result.status, result.message = "skipped", "already imported"
        return result
    refusal = still_being_written(unit) or await _changed_since_import(engine, unit)
    if refusal:
        result.status, result.message = "refused", refusal
        return result
    for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
        spool = _Quarantine(quarantine)
        try:
            await _store(engine, unit, reader, identity, result, spool, progress, allow_duplicates)
            break
        except Exception as exc:
            if not _deadlocked(exc) or attempt == DEADLOCK_ATTEMPTS:
                raise
            # Rolled back whole: start the file over.
            result = FileResult(unit.display, format=reader.format)
        finally:
            spool.close()
    result.seconds = time.perf_counter() - started
    return result


async def _store(
    engine: AsyncEngine,
    unit: ImportUnit,
    reader: Reader,
    identity: str,
    result: FileResult,
    spool: _Quarantine,
    progress: ImportProgress | None,
    allow_duplicates: bool,
) -> None:
    """One attempt at the file's transaction: ledger entry, rows, counts; then the quarantine."""
    content = hashlib.sha256()

    async def pieces() -> AsyncIterator[_Piece]:
        async for piece in _pieces(reader, content):
            result.rows += piece.rows
            result.quarantined += len(piece.rejected)
            spool.add(unit.display, piece.rejected)
            if piece.first is not None and piece.last is not None:
                first, last = result.first_timestamp, result.last_timestamp
                result.first_timestamp = piece.first if first is None else min(first, piece.first)
                result.last_timestamp = piece.last if last is None else max(last, piece.last)
            if progress is not None:
                progress.rows_done(piece.rows)
            yield piece

    try:
        async with engine.begin() as conn:
            claimed = await conn.scalar(
                text(
                    f"INSERT INTO {_LEDGER} (file_sha256, path, format, rows, quarantined) "
                    "VALUES (:key, :path, :format, 0, 0) ON CONFLICT DO NOTHING RETURNING 1"
                ),
                {"key": identity, "path": unit.display, "format": reader.format},
            )
            if claimed is None:  # another importer committed it meanwhile
                result.status, result.message = "skipped", "already imported"
                return
            raw = await raw_connection(conn)
            if allow_duplicates:

                async def data() -> AsyncIterator[bytes]:
                    async for piece in pieces():
                        if piece.data:
                            yield piece.data

                await copy_quotes_in(raw, data(), format="csv")
            else:
                skipper = SkipStored(raw)
                async for piece in pieces():
                    if piece.first is not None and piece.last is not None:
                        await skipper.add(
                            piece.data, piece.rows, piece.symbols, piece.first, piece.last
                        )
                result.rows, result.duplicates = await skipper.finish()
            content_key = keyed(content.hexdigest(), reader.format, reader.context)
            try:
                await conn.execute(
                    text(
                        f"UPDATE {_LEDGER} SET rows = :rows, quarantined = :quarantined, "
                        "first_timestamp = :first, last_timestamp = :last, "
                        "content_sha256 = :content WHERE file_sha256 = :key"
                    ),
                    {
                        "rows": result.rows,
                        "quarantined": result.quarantined,
                        "first": result.first_timestamp,
                        "last": result.last_timestamp,
                        "content": content_key,
                        "key": identity,
                    },
                )
            except IntegrityError:
                # The same content came in before under another name or compression; the
                # transaction (its rows and this entry) is rolled back on the way out.
                raise _SameContent(content_key) from None
        spool.publish()
    except _SameContent as same:
        async with engine.connect() as conn:
            earlier = await conn.scalar(
                text(f"SELECT path FROM {_LEDGER} WHERE content_sha256 = :content"),
                {"content": same.content_key},
            )
        result.status = "skipped"
        result.message = f"same content as {earlier}, already imported"
        result.rows = result.duplicates = result.quarantined = 0
        result.first_timestamp = result.last_timestamp = None


async def import_paths(
    engine: AsyncEngine,
    paths: Sequence[Path],
    *,
    options: ImportOptions | None = None,
    quarantine: Path | None = None,
    progress: ImportProgress | None = None,
    allow_duplicates: bool = False,
) -> ImportSummary:
    """Import files and directories (walked recursively); one result per file or zip member.

    A refused file does not stop the run; a database error does (it is raised). Rejected lines
    go to ``quarantine`` (default ``quarantine-<UTC time>.csv`` in the working directory,
    created only when a line is rejected). Quotes the table already holds are skipped and
    counted (``duplicates``), unless ``allow_duplicates`` (see :mod:`.dedupe`).
    """
    options = options or ImportOptions()
    started = time.perf_counter()
    if quarantine is None:
        quarantine = Path(f"quarantine-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.csv")
    summary = ImportSummary(quarantine_path=quarantine)
    units = list(expand(list(paths)))
    for index, unit in enumerate(units):
        if progress is not None:
            progress.file_started(unit.display, index, len(units))
        try:
            result = await import_unit(
                engine,
                unit,
                options=options,
                quarantine=quarantine,
                progress=progress,
                allow_duplicates=allow_duplicates,
            )
        except FileNotFoundError as exc:
            result = FileResult(unit.display, status="failed", message=str(exc))
        summary.files.append(result)
        if progress is not None:
            progress.file_done(result)
    summary.seconds = time.perf_counter() - started
    if not summary.quarantined:
        summary.quarantine_path = None
    return summary
