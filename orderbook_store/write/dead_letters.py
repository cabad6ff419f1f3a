"""Rows the server refused, kept on disk with its reason: the writer's dead letters.

A row can pass every check of :func:`orderbook_store.quote.to_row` and still be refused by the
server: a CHECK constraint a DBA added, a character the database's encoding cannot store, a
unique index. The writer finds such rows by bisecting their batch, writes every other row, and
appends each refused row here, so one bad row never holds up the rows behind it and is never
silently dropped.

Where
    ``dead-letters.jsonl`` beside the spool, in the writer's per-database spool directory
    (``<DB_SPOOL_DIR>/<database>@<host>-<port>/dead-letters.jsonl``). ``orderbook-store doctor``
    shows how many there are and where; ``orderbook-store dead-letters`` lists them.

Format
    JSON lines, one per refused row: ``time`` (UTC, ISO 8601), ``batch_id`` and ``row_index``
    (which batch, which row in it), ``sqlstate`` and ``reason`` (the server's message), and
    ``row`` (the columns as sent: decimals as exact strings, timestamps as integers). A crash
    between writing a dead letter and committing its batch can repeat an entry; readers here
    drop repeats by ``(batch_id, row_index)``.

Every append is one ``write`` and an ``fsync`` under an exclusive ``flock``, so entries from
several writers on one host never interleave and survive a crash.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from orderbook_store.errors import OrderbookStoreError

__all__ = ["FILE_NAME", "DeadLetter", "DeadLetterError", "append", "read"]

FILE_NAME = "dead-letters.jsonl"


class DeadLetterError(OrderbookStoreError, OSError):
    """The dead-letter file could not be written (disk full, permissions)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One refused row and why."""

    time: str
    batch_id: str
    row_index: int
    sqlstate: str | None
    reason: str
    row: dict[str, str | int | None]

    @classmethod
    def now(
        cls,
        batch_id: str,
        row_index: int,
        sqlstate: str | None,
        reason: str,
        row: dict[str, str | int | None],
    ) -> DeadLetter:
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        return cls(stamp, batch_id, row_index, sqlstate, reason, row)


def append(path: Path, letters: Sequence[DeadLetter]) -> None:
    """Append ``letters`` durably (one write, fsync). Raises :class:`DeadLetterError`."""
    if not letters:
        return
    data = "".join(
        json.dumps(asdict(letter), ensure_ascii=False, separators=(",", ":")) + "\n"
        for letter in letters
    ).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(data)
            written = 0
            while written < len(data):
                written += os.write(fd, view[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise DeadLetterError(
            f"cannot write the dead-letter file {path}: {exc.strerror or exc}"
        ) from exc


def _entries(path: Path) -> Iterator[DeadLetter]:
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                raw = json.loads(line)
                yield DeadLetter(**raw)
            except (ValueError, TypeError):
                continue  # a torn last line (a crash mid-write): nothing to report


def read(path: Path) -> list[DeadLetter]:
    """Every dead letter in ``path``, oldest first, each once (an absent file: none)."""
    seen: set[tuple[str, int]] = set()
    letters: list[DeadLetter] = []
    for letter in _entries(path):
        key = (letter.batch_id, letter.row_index)
        if key not in seen:
            seen.add(key)
            letters.append(letter)
    return letters
