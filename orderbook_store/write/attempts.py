"""How the writer attempts a batch, and what a failure does to its schedule.

A write is one transaction (``write.transactions``); one that timed out or had rows refused is
written again at once, carefully (``write.careful``); any other failure is classified
(``write.failures``) and schedules the next attempt: soon, with backoff, for passing trouble;
every ``config_retry_s`` for a configuration problem, which ``writes_blocked`` then names with
its fix. The counters and latencies ``stats()`` reports live here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.pg.copy_in import decode_copy_line
from orderbook_store.settings import Settings
from orderbook_store.write import dead_letters
from orderbook_store.write.batches import BatchBook
from orderbook_store.write.careful import CopySizer, Refused
from orderbook_store.write.commit_times import CommitTimes
from orderbook_store.write.failures import (
    Failure,
    FailureClass,
    RepeatFilter,
    classify,
    describe,
)
from orderbook_store.write.stats import WriterStats, format_fields, percentile
from orderbook_store.write.transactions import prune_ledger, write_batch, write_batch_carefully

__all__ = ["WriteAttempts"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Latencies kept for the p50/p99 in ``stats()``.
_LATENCY_WINDOW = 1024


class WriteAttempts(BatchBook):
    """Attempts, their outcomes and the retry schedule; ``Writer`` drives them."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        *,
        write_timeout_s: float,
        retry_base_s: float,
        retry_cap_s: float,
        config_retry_s: float,
        ledger_retention_s: float,
    ) -> None:
        super().__init__(settings)
        self._engine = engine
        self._settings = settings
        #: Rows per COPY statement; lowered when one times out, grown back after clean writes.
        self._sizer = CopySizer(self._max_batch_rows)
        self._write_timeout_s = write_timeout_s
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        self._config_retry_s = config_retry_s
        self._ledger_retention_s = ledger_retention_s
        #: Where rows the server refused are kept (see orderbook_store.write.dead_letters).
        self.dead_letter_path = self.spool_dir / dead_letters.FILE_NAME
        self._attempt = 0
        self._failures = 0  # failed attempts ever (flush compares before and after)
        self._retry_at = 0.0
        self._last_error = ""
        self._failure: Failure | None = None
        #: A configuration failure is logged at ERROR when it changes, else once a minute.
        self._config_said = RepeatFilter()
        self._last_prune = float("-inf")
        #: Latency buckets and the last commit's time, for orderbook_store.metrics.
        self.commit_times = CommitTimes()
        self._rejected = 0
        self._refused = 0
        self._written = 0
        self._replayed = 0
        self._retries = 0
        self._batches = 0
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        #: Row indexes already in the dead-letter file, per batch not yet committed.
        self._dead_lettered: dict[uuid.UUID, set[int]] = {}

    @property
    def writes_blocked(self) -> str | None:
        """Why writes fail for a reason that needs a fix (with the fix), else ``None``. Cheap."""
        failure = self._failure
        if failure is not None and failure.kind is FailureClass.CONFIGURATION:
            return self._last_error
        return None

    def stats(self) -> WriterStats:
        """Counters and flush latencies (cheap: no I/O)."""
        latencies = sorted(self._latencies)
        failure = self._failure
        return WriterStats(
            rows_added=self._taken + len(self._pending),
            rows_written=self._written,
            rows_spooled=self._spooled,
            rows_replayed=self._replayed,
            rows_rejected=self._rejected,
            rows_refused=self._refused,
            rows_pending=len(self._pending) + sum(b.rows for b in self._unspooled),
            rows_in_spool=self._in_spool,
            retries=self._retries,
            batches=self._batches,
            last_flush_latency_s=self._latencies[-1] if self._latencies else None,
            flush_latency_p50_s=percentile(latencies, 0.5) if latencies else None,
            flush_latency_p99_s=percentile(latencies, 0.99) if latencies else None,
            last_error=self._last_error or None,
            failure_class=failure.kind.value if failure is not None else None,
        )

    def _failed(self, exc: BaseException, failure: Failure) -> None:
        self._attempt += 1
        self._failures += 1
        self._retries += 1
        self._failure = failure
        reason = self._describe(exc)
        if failure.kind is FailureClass.CONFIGURATION:
            self._last_error = f"{reason}; to fix: {failure.fix}"
            delay = self._config_retry_s * random.uniform(0.8, 1.2)
        else:
            self._last_error = reason
            ceiling = min(self._retry_cap_s, self._retry_base_s * 2 ** min(self._attempt - 1, 30))
            delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        self._retry_at = time.monotonic() + delay
        stats = self.stats()
        level = logging.WARNING
        if failure.kind is FailureClass.CONFIGURATION:
            level = logging.ERROR if self._config_said.due(self._last_error) else logging.DEBUG
        log.log(
            level,
            "write failed (%s, attempt %d, retrying in %.2f s): %s; %s",
            failure.kind.value,
            self._attempt,
            delay,
            self._last_error,
            format_fields(stats),
            extra={"orderbook_store": stats.as_dict()},
        )
        if failure.kind is FailureClass.CONFIGURATION:
            self._wake_all_waiters()  # each flush decides whether to raise

    def _succeeded(self, latency_s: float) -> None:
        self._latencies.append(latency_s)
        self.commit_times.committed(latency_s)
        if self._attempt:
            log.info(
                "database reachable again after %d failed attempt(s); %d row(s) in the spool "
                "are replayed first",
                self._attempt,
                self._in_spool,
            )
        self._attempt = 0
        self._last_error = ""
        self._failure = None

    async def _attempt_write(
        self,
        batch_id: uuid.UUID,
        rows: int,
        data: bytes | AsyncIterator[bytes],
        encoded: Callable[[], bytes],
    ) -> tuple[bool, int] | None:
        """(True, rows refused): written now; (False, 0): already in the ledger; None: failed
        (retry scheduled).

        The common case is one COPY of the whole batch. A batch larger than what recently fit
        in one statement, or one whose COPY timed out or had rows refused, is written again at
        once, carefully (``write.careful``), each statement with its own time limit.
        """
        started = time.perf_counter()
        careful = rows > self._sizer.limit
        try:
            if not careful:
                try:
                    written = await asyncio.wait_for(
                        write_batch(self._engine, batch_id, rows, data), self._timeout_for(rows)
                    )
                    result = (written, 0)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if self._classify(exc).kind not in (
                        FailureClass.TOO_BIG,
                        FailureClass.ROWS_REFUSED,
                    ):
                        raise
                    careful = True
            # Not inside the except block above: a failure of the careful pass must be judged
            # on its own, not by the refusal that led to it (its __context__).
            if careful:
                result = await self._write_carefully(batch_id, encoded())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc, self._classify(exc))
            return None
        self._dead_lettered.pop(batch_id, None)
        self._succeeded(time.perf_counter() - started)
        if result[0]:
            self._batches += 1
        return result

    async def _prune_ledger(self) -> None:
        self._last_prune = time.monotonic()
        try:
            pruned = await prune_ledger(self._engine, self._ledger_retention_s)
        except Exception as exc:
            log.warning("ledger prune failed (%s); retried in an hour", self._describe(exc))
            return
        if pruned:
            log.info(
                "ledger: pruned %d entries older than %.0f s", pruned, self._ledger_retention_s
            )

    def _describe(self, exc: BaseException) -> str:
        secret = self._settings.password
        return describe(
            exc,
            secret=secret.get_secret_value() if secret is not None else "",
            write_timeout_s=self._write_timeout_s,
        )

    def _classify(self, exc: BaseException) -> Failure:
        return classify(exc, user=self._settings.user, database=self._settings.name)

    async def _write_carefully(self, batch_id: uuid.UUID, data: bytes) -> tuple[bool, int]:
        refused = await write_batch_carefully(
            self._engine,
            batch_id,
            data,
            self._sizer,
            self._classify,
            keep_refused=self._dead_letter,
            timed=self._timed,
        )
        if refused is None:
            return False, 0
        self._refused += refused
        return True, refused

    async def _timed(self, step: Awaitable[_T], rows: int) -> _T:
        return await asyncio.wait_for(step, self._timeout_for(rows))

    async def _dead_letter(
        self, batch_id: uuid.UUID, lines: list[bytes], refused: list[Refused]
    ) -> None:
        """Keep refused rows on disk (before the batch commits) and say so in one line.

        A batch whose careful attempt failed after this (the connection lost before the
        commit) is attempted again; the rows it already kept are not appended twice.
        """
        kept = self._dead_lettered.setdefault(batch_id, set())
        letters = [
            dead_letters.DeadLetter.now(
                str(batch_id), r.index, r.sqlstate, r.reason, decode_copy_line(lines[r.index])
            )
            for r in refused
            if r.index not in kept
        ]
        try:
            await self._io(dead_letters.append, self.dead_letter_path, letters)
            kept.update(letter.row_index for letter in letters)
            where = f"kept in {self.dead_letter_path}"
        except dead_letters.DeadLetterError as exc:
            where = f"NOT kept on disk ({exc}); the rows: {[d.row for d in letters]}"
        log.error(
            "writer: the server refused %d of %d row(s) of batch %s (%s: %s); the other rows "
            "are written, the refused ones %s",
            len(refused),
            len(lines),
            batch_id,
            refused[0].sqlstate,
            refused[0].reason,
            where,
        )

    def _timeout_for(self, rows: int) -> float:
        """The write timeout, stretched for big batches (allowing 10,000 rows/s), so a large
        batch on a slow link is not cut off, retried and cut off again forever."""
        return self._write_timeout_s + rows / 10_000
