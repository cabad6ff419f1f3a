"""Writing a batch the plain way could not: smaller COPY statements, and refused rows found.

When a batch's COPY times out (statement or lock timeout) or the server refuses some of its
rows (a constraint, the encoding), the writer writes it again in one transaction as COPY
statements under savepoints: one that times out is halved (and the size that fits is kept for
later batches), one with refused rows is bisected down to the rows themselves. Every other row
is written; the refused ones are returned for the dead-letter file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from orderbook_store.pg.connection import copy_quotes_in
from orderbook_store.write.failures import Failure, FailureClass

__all__ = ["CopySizer", "Refused", "copy_bisecting"]

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


def _halves(low: int, high: int) -> list[tuple[int, int]]:
    middle = (low + high) // 2
    return [(low, middle), (middle, high)]


async def copy_bisecting(
    raw: asyncpg.Connection,
    lines: list[bytes],
    sizer: CopySizer,
    classify: Callable[[BaseException], Failure],
) -> list[Refused]:
    """COPY ``lines`` (rows of COPY text) on ``raw``, inside its transaction, as statements of
    at most ``sizer.limit`` rows, each under a savepoint; returns the rows the server refused.

    Every savepoint is gone before the next one is set (released, or rolled back and then
    released): a savepoint left behind after ``ROLLBACK TO`` would nest the next one inside
    it, and with thousands of refused rows the nested levels hold enough locks to run the
    whole server's shared lock table out of memory, for every session. Any other failure is
    raised (the transaction is then lost to the caller).
    """
    refused: list[Refused] = []
    timed_out = False
    stack = [(0, len(lines))]
    while stack:
        low, high = stack.pop()
        if high - low > sizer.limit:
            stack.extend(reversed(_halves(low, high)))
            continue
        await raw.execute("SAVEPOINT orderbook_rows")
        try:
            await copy_quotes_in(raw, b"".join(lines[low:high]))
        except asyncpg.PostgresError as exc:
            # Roll back, then drop the savepoint itself: the next one is not nested in it.
            await raw.execute("ROLLBACK TO SAVEPOINT orderbook_rows")
            await raw.execute("RELEASE SAVEPOINT orderbook_rows")
            failure = classify(exc)
            if failure.kind is FailureClass.ROWS_REFUSED and high - low == 1:
                first_line = str(exc).strip().splitlines()
                refused.append(Refused(low, failure.sqlstate, first_line[0] if first_line else ""))
                continue
            if failure.kind is FailureClass.TOO_BIG and high - low > 1:
                timed_out = True
                sizer.timed_out(high - low)
            elif failure.kind is not FailureClass.ROWS_REFUSED:
                raise
            stack.extend(reversed(_halves(low, high)))
            continue
        await raw.execute("RELEASE SAVEPOINT orderbook_rows")
    if timed_out:
        log.info(
            "writer: a COPY timed out (statement or lock timeout); batches are now written as "
            "COPY statements of at most %d rows",
            sizer.limit,
        )
    else:
        sizer.clean()
    return refused
