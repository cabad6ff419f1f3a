"""Writing a batch the plain way could not: smaller COPY statements, and refused rows found.

When a batch's COPY times out (statement or lock timeout) or the server refuses some of its
rows (a constraint, the encoding), the writer writes it again in one transaction as COPY
statements under savepoints: one that times out is halved (and the size that fits is kept for
later batches); in one with refused rows, the server's error names the row, which is set aside
while the rows before and after it are written. Every other row is written; the refused ones
are returned for the dead-letter file.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import asyncpg

from orderbook_store.pg.connection import copy_quotes_in
from orderbook_store.write.failures import Failure, FailureClass

__all__ = ["CopySizer", "Refused", "Timed", "copy_bisecting"]

log = logging.getLogger(__name__)

#: Clean writes in a row after which the COPY statement size, lowered by a timeout, doubles.
GROW_AFTER_CLEAN_WRITES = 16


@dataclass(slots=True)
class CopySizer:
    """Rows per COPY statement: lowered when one times out, grown back after clean writes."""

    ceiling: int
    limit: int = 0
    clean_writes: int = 0

    def __post_init__(self) -> None:
        self.limit = self.limit or self.ceiling

    def timed_out(self, rows: int) -> None:
        self.limit = max(1, rows // 2)
        self.clean_writes = 0

    def clean(self) -> None:
        self.clean_writes += 1
        if self.clean_writes >= GROW_AFTER_CLEAN_WRITES and self.limit < self.ceiling:
            self.clean_writes = 0
            self.limit = min(self.ceiling, self.limit * 2)


@dataclass(frozen=True, slots=True)
class Refused:
    """A row the server refused inside a batch: its index, SQLSTATE and message."""

    index: int
    sqlstate: str | None
    reason: str


#: After a refused row, the rows behind it go in statements that start this small and double
#: while they pass: where refusals are dense, each failing COPY resends only a few rows.
_PROBE_ROWS = 16

_COPY_LINE = re.compile(r"\bCOPY [^,]+, line (\d+)")

_T = TypeVar("_T")


class Timed(Protocol):
    """Awaits one statement with a time limit that depends on how many rows it carries."""

    def __call__(self, step: Awaitable[_T], rows: int, /) -> Awaitable[_T]: ...


def _refused_offset(exc: asyncpg.PostgresError, rows: int) -> int | None:
    """Which row of the failed COPY the server refused (0-based), when its CONTEXT says."""
    match = _COPY_LINE.search(getattr(exc, "context", None) or "")
    if match is None:
        return None
    line = int(match.group(1))
    return line - 1 if 1 <= line <= rows else None


async def _copy_under_savepoint(
    raw: asyncpg.Connection, chunk: bytes, rows: int, timed: Timed
) -> asyncpg.PostgresError | None:
    """COPY ``chunk`` under a savepoint that is gone afterwards; the server's refusal, if any.

    The savepoint is released after ``ROLLBACK TO`` too: one left behind would nest the next
    inside it, and with thousands of refused rows the nested levels hold enough locks to run
    the whole server's shared lock table out of memory, for every session.
    """
    await timed(raw.execute("SAVEPOINT orderbook_rows"), 0)
    try:
        await timed(copy_quotes_in(raw, chunk), rows)
    except asyncpg.PostgresError as exc:
        error = exc
    else:
        await timed(raw.execute("RELEASE SAVEPOINT orderbook_rows"), 0)
        return None
    # Outside the except block: a failure here must not look caused by the refusal.
    await timed(raw.execute("ROLLBACK TO SAVEPOINT orderbook_rows"), 0)
    await timed(raw.execute("RELEASE SAVEPOINT orderbook_rows"), 0)
    return error


async def copy_bisecting(
    raw: asyncpg.Connection,
    lines: list[bytes],
    sizer: CopySizer,
    classify: Callable[[BaseException], Failure],
    timed: Timed,
) -> list[Refused]:
    """COPY ``lines`` (rows of COPY text) on ``raw``, inside its transaction, as statements of
    at most ``sizer.limit`` rows, each under a savepoint; returns the rows the server refused.

    The server names the line a COPY failed on, so each refused row costs about two
    statements: the failing one, and the rows before it again. Where it does not (a deferred
    constraint), the statement is halved until the row is found. ``timed`` bounds every
    statement, so a long search is never cut off as a whole, only a statement that hangs.
    Any failure other than refused rows or a statement timeout is raised (the transaction is
    then lost to the caller).
    """
    refused: list[Refused] = []
    timed_out = False
    total = len(lines)
    pos = 0
    size = sizer.limit
    skip: int | None = None  # a refused row ahead of pos: the rows before it go first
    while pos < total:
        if pos == skip:
            pos, skip = pos + 1, None
            continue
        end = min(total, pos + size, total if skip is None else skip)
        error = await _copy_under_savepoint(raw, b"".join(lines[pos:end]), end - pos, timed)
        if error is None:
            pos = end
            size = min(sizer.limit, size * 2)
            continue
        failure = classify(error)
        if failure.kind is FailureClass.TOO_BIG and end - pos > 1:
            timed_out = True
            sizer.timed_out(end - pos)
            size = sizer.limit
            continue
        if failure.kind is not FailureClass.ROWS_REFUSED:
            raise error
        offset = 0 if end - pos == 1 else _refused_offset(error, end - pos)
        if offset is None:
            size = max(1, (end - pos) // 2)
            continue
        first_line = str(error).strip().splitlines()
        refused.append(Refused(pos + offset, failure.sqlstate, first_line[0] if first_line else ""))
        skip = pos + offset
        size = max(_PROBE_ROWS, 2 * (offset + 1))
    if timed_out:
        log.info(
            "writer: a COPY timed out (statement or lock timeout); batches are now written as "
            "COPY statements of at most %d rows",
            sizer.limit,
        )
    else:
        sizer.clean()
    return refused
