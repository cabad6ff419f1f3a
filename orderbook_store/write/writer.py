"""``Writer``: the buffer behind ``OrderbookRepository.add`` and the task that writes it.

How quotes travel, what each failure class does, the bounds and the contracts are described
in :mod:`orderbook_store.write` (the package docstring): this module implements them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.errors import (
    DatabaseUnavailable,
    InvalidQuote,
    RowsLost,
    WriterBackpressure,
    WriterClosed,
    WritesBlocked,
)
from orderbook_store.quote import Quote, to_row
from orderbook_store.settings import Settings
from orderbook_store.write.attempts import WriteAttempts
from orderbook_store.write.batches import Batch
from orderbook_store.write.failures import (
    Failure,
    FailureClass,
)
from orderbook_store.write.spool import (
    SpoolRecord,
)
from orderbook_store.write.stats import WriterStats, format_fields
from orderbook_store.write.transactions import (
    stream_copy_text,
)

__all__ = ["Writer", "WriterStats"]

log = logging.getLogger(__name__)


#: While a batch is ready, ``add`` gives the event loop a turn once per this many calls, so a
#: producer that never awaits anything else cannot starve the write in flight.
_YIELD_EVERY_ROWS = 256
#: How often (seconds) the ledger is pruned and the spool directory looked at for batches
#: left by writers that stopped while this one runs.
_PRUNE_EVERY_S = 3600.0


class Writer(WriteAttempts):
    """Buffered, group-committing, spooling writer for one engine (see ``orderbook_store.write``).

    Bound to the event loop of its first ``add``/``flush``. Not for use from several threads.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        *,
        write_timeout_s: float = 60.0,
        close_timeout_s: float = 30.0,
        retry_base_s: float = 0.05,
        retry_cap_s: float = 5.0,
        config_retry_s: float = 5.0,
        ledger_retention_s: float = 7 * 86400.0,
    ) -> None:
        super().__init__(
            engine,
            settings,
            write_timeout_s=write_timeout_s,
            retry_base_s=retry_base_s,
            retry_cap_s=retry_cap_s,
            config_retry_s=config_retry_s,
            ledger_retention_s=ledger_retention_s,
        )
        self._flush_interval_s = settings.flush_interval_s
        self._close_timeout_s = close_timeout_s
        self._in_flight: Batch | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closing = False
        self._closed = False

    # -- the hot path ---------------------------------------------------------------------

    async def add(self, quote: Quote | Mapping[str, object]) -> None:
        """Validate ``quote`` and buffer it; returns at once, never awaiting the database.

        Raises ``InvalidQuote`` for a quote that breaks a rule (nothing else is affected),
        ``WriterClosed`` once ``close()`` has begun and ``WriterBackpressure`` when the quote
        can be neither held (``max_pending``) nor spooled; in each case it was not taken.
        """
        if self._closing:
            raise self._closed_error()
        try:
            row = to_row(quote)
        except InvalidQuote:
            self._rejected += 1
            raise
        pending = self._pending
        pending.append(row)
        n = len(pending)
        # Only a few calls in a batch go further: the one completing a batch (wakes the
        # flusher), every _YIELD_EVERY_ROWS-th (gives the loop a turn) and overflow.
        if (
            n >= self._batch_size
            and (n == self._batch_size or not n % _YIELD_EVERY_ROWS or n >= self._spill_at)
        ) or self._task is None:
            await self._batch_ready(n)

    async def add_many(self, quotes: Iterable[Quote | Mapping[str, object]]) -> int:
        """``add`` each quote; returns how many were buffered.

        Every valid quote is buffered; if some were invalid, the first ``InvalidQuote`` is
        raised after the others are in (``stats().rows_rejected`` counts them all). A
        ``WriterBackpressure`` stops the call; its ``accepted`` says how many were taken.
        """
        if self._closing:
            raise self._closed_error()
        first_error: InvalidQuote | None = None
        accepted = 0
        pending = self._pending
        try:
            for quote in quotes:
                try:
                    row = to_row(quote)
                except InvalidQuote as exc:
                    self._rejected += 1
                    if first_error is None:
                        first_error = exc
                    continue
                pending.append(row)
                accepted += 1
                n = len(pending)
                if n >= self._batch_size and (
                    n == self._batch_size or not n % _YIELD_EVERY_ROWS or n >= self._spill_at
                ):
                    await self._batch_ready(n)
                    if self._closing:
                        # close() began while we awaited: what is in is close()'s to keep.
                        raise self._closed_error(accepted)
                    pending = self._pending
            if self._task is None or len(pending) >= self._batch_size:
                await self._batch_ready(len(pending))
        except WriterBackpressure as exc:
            exc.accepted = accepted - 1  # the quote that met it was given back
            raise
        if first_error is not None:
            raise first_error
        return accepted

    async def _batch_ready(self, n: int) -> None:
        if self._task is None:
            if self._closed:
                self._pending.pop()  # the row just added: it was not taken
                raise self._closed_error()
            self._start()
            if n < self._batch_size:
                return
        wake = self._wake
        assert wake is not None
        if not wake.is_set():
            wake.set()
        if n >= self._spill_at:
            while self._spills and n + self._unsafe_rows >= 2 * self._max_pending:
                # The disk is behind by a whole max_pending: wait for it (the disk, never the
                # database), one record at a time, so memory stays bounded however fast the
                # producer is and no single add() waits longer than one record's write.
                await asyncio.wait(self._spills, return_when=asyncio.FIRST_COMPLETED)
            if self._closing:
                return  # the row was in before close() began: close() keeps it
            if self._spool_error is not None and n + self._unsafe_rows >= self._max_pending:
                self._pending.pop()  # the row just added is handed back to the caller
                raise WriterBackpressure(
                    f"{n - 1 + self._unsafe_rows} row(s) are held in memory "
                    f"(DB_MAX_PENDING={self._max_pending}) and the spool {self.spool_dir} "
                    f"refuses them ({self._spool_error}); the database: "
                    f"{self._last_error or 'slow'}. The quote was not taken: retry it later"
                )
            if n >= self._max_pending:
                self._spill()
        elif not n % _YIELD_EVERY_ROWS:
            await asyncio.sleep(0)

    def _closed_error(self, accepted: int | None = None) -> WriterClosed:
        taken = (
            "the quote was not taken"
            if accepted is None
            else (f"the first {accepted} quote(s) were taken, the rest were not")
        )
        error = WriterClosed(
            f"the writer is closed (or closing): {taken}; make a new OrderbookRepository"
        )
        error.accepted = accepted or 0
        return error

    # -- life cycle -------------------------------------------------------------------------

    def _start(self) -> None:
        if self._closed:
            raise self._closed_error()
        if self._task is not None:
            return
        self._wake = asyncio.Event()
        self._io_pool = ThreadPoolExecutor(1, thread_name_prefix="orderbook-spool")
        # Opening the spool (and adopting what a stopped writer left) runs on the spool thread,
        # first in its queue, while rows already flow to the database: under a busy producer
        # that thread can wait a while for the GIL, and new rows need not wait for it.
        opening = asyncio.ensure_future(self._io(self._open_spool))
        opening.add_done_callback(self._spool_opened)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="orderbook-writer")

    async def start(self) -> None:
        """Start the background task now (``add`` does it on first use) and open the spool."""
        self._start()
        await self._io(lambda: None)  # queued behind the spool's opening

    async def flush(self, timeout_s: float | None = None) -> None:
        """Return once every row added before this call is committed.

        With ``timeout_s``, if that does not happen in time, every such row is first made
        durable in the spool and then ``DatabaseUnavailable`` is raised; those rows are written
        as soon as the server answers (by this writer or, after a stop, the next one). A
        configuration failure raises ``WritesBlocked`` at once (after one more attempt), with
        the rows likewise in the spool.
        """
        target = self._taken + len(self._pending)
        self._start()
        if self._watermark() >= target:
            return
        assert self._wake is not None
        failures_before = self._failures
        if self.writes_blocked is not None:
            self._retry_at = 0.0  # one attempt now: the cause may have been fixed
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._watermark() < target:
            if self.writes_blocked is not None and self._failures > failures_before:
                durable = await self._make_durable()
                raise self._blocked_error(target - self._watermark(), durable)
            self._wake.set()
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((target, waiter))
            try:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                await asyncio.wait_for(asyncio.shield(waiter), remaining)
            except asyncio.TimeoutError:
                left = target - self._watermark()
                durable = await self._make_durable()
                raise DatabaseUnavailable(
                    f"flush: {left} row(s) not committed within {timeout_s:g} s "
                    f"({self._last_error or 'the database is slow'}); "
                    + (
                        f"they are safe in the spool {self.spool_dir} and are written when "
                        "the server answers"
                        if durable
                        else "the spool is unavailable too, so they are held in memory only"
                    )
                ) from None
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove((target, waiter))

    def _blocked_error(self, rows: int, durable: bool) -> WritesBlocked:
        where = (
            f"kept in the spool {self.spool_dir}"
            if durable
            else "held in memory (the spool is unavailable too)"
        )
        error = WritesBlocked(
            f"writes are blocked: {self._last_error}. {rows} row(s) are {where} and are "
            "written once this is fixed"
        )
        error.fix = self._failure.fix if self._failure is not None else ""
        return error

    async def close(self, timeout_s: float | None = None) -> None:
        """Flush (up to ``timeout_s``, default 30 s), stop, and leave the rest in the spool.

        Raises ``WritesBlocked`` if a configuration failure kept rows from the table (they
        are in the spool) and ``RowsLost`` if rows could be neither written nor spooled.
        """
        if self._closed or self._closing:
            return
        timeout = self._close_timeout_s if timeout_s is None else timeout_s
        self._closing = True
        blocked: WritesBlocked | None = None
        try:
            if self._task is not None or self._pending:
                try:
                    await self.flush(timeout)
                except WritesBlocked as exc:
                    blocked = exc
                except DatabaseUnavailable:
                    pass
        finally:
            self._closed = True
            lost, kept = await self._shutdown()
            self._task = None
        if lost:
            raise RowsLost(
                f"{lost} row(s) could be neither written ({self._last_error or 'no answer'}) "
                f"nor kept in the spool {self.spool_dir} ({self._spool_error or 'unavailable'})",
                lost,
            )
        if blocked is not None and kept:
            raise self._blocked_error(kept, True)

    async def _shutdown(self) -> tuple[int, int]:
        """Stop the task, spool what is left, close the spool; (rows lost, rows kept)."""
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._io_pool is not None:
            # Whatever the task left uncommitted (a write cut short, rows added meanwhile).
            await self._make_durable()
            while self._pending:  # rows that came in while the spool was written
                await self._make_durable()
        left_rows = self._in_spool
        left_batches = self._spool_records
        lost = sum(b.rows for b in self._outstanding.values() if not b.spooled) + len(self._pending)
        if self._io_pool is not None:
            await self._io(self._close_spool)
            self._io_pool.shutdown(wait=True)
            self._io_pool = None
        stats = self.stats()
        if lost:
            log.error(
                "writer closed: %d row(s) could be neither written nor spooled and are lost "
                "(%s; spool: %s); %s",
                lost,
                self._last_error,
                self._spool_error,
                format_fields(stats),
                extra={"orderbook_store": stats.as_dict()},
            )
        elif left_rows or left_batches:
            level = logging.ERROR if self.writes_blocked is not None else logging.WARNING
            log.log(
                level,
                "writer closed: %d row(s) in %d batch(es) not written within the close "
                "timeout stay in the spool %s and are written at the next start (%s); %s",
                left_rows,
                left_batches,
                self.spool_dir,
                self._last_error or "database slow",
                format_fields(stats),
                extra={"orderbook_store": stats.as_dict()},
            )
        else:
            log.info(
                "writer closed: everything written; %s",
                format_fields(stats),
                extra={"orderbook_store": stats.as_dict()},
            )
        return lost, left_rows

    # -- the background task ----------------------------------------------------------------

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            if self._attempt:
                # Failing: no hurry for full batches (they are spooled, one fsync each); wake
                # for the retry, to spool what the interval collected, or for a flush.
                remaining = self._retry_at - time.monotonic()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        wake.wait(), max(0.0, min(self._flush_interval_s, remaining))
                    )
            elif not wake.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), self._flush_interval_s)
            wake.clear()
            try:
                await self._cycle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not stop the writer; the rows are still held
                log.exception("writer: unexpected error; retrying")
                self._failed(exc, Failure(FailureClass.PASSING))

    async def _cycle(self) -> None:
        """One round: replay the spool in order, then write one batch of what is pending."""
        if self._attempt and time.monotonic() < self._retry_at:
            # The database is failing: make what is held in memory durable while we wait.
            if self._unspooled and not await self._spool_batch(self._unspooled[0]):
                return
            for batch in self._take_all():
                if not await self._spool_batch(batch):
                    return
            return
        if (
            self._spool_ok
            and (self._spool_records > 0 or self._spills or self._backlog)
            and not await self._replay_spool()
        ):
            return
        while self._unspooled:
            batch = self._unspooled[0]
            if not await self._write_batch(batch):
                return
            # Not popleft(): the spool may have taken this batch (and dropped it from the
            # queue) while it was being written.
            with contextlib.suppress(ValueError):
                self._unspooled.remove(batch)
        if self._pending:
            batch = self._take()
            self._in_flight = batch
            try:
                ok = await self._write_batch(batch)
            finally:
                self._in_flight = None
            if not ok:
                await self._spool_batch(batch)
                return
            if len(self._pending) >= self._batch_size:
                assert self._wake is not None
                self._wake.set()  # more than one batch was waiting: go on at once
        if time.monotonic() - self._last_prune > _PRUNE_EVERY_S:
            await self._prune_ledger()
            if self._spool_ok:
                records, rows = await self._io(self._adopt_orphans)
                self._spool_records += records
                self._in_spool += rows

    async def _replay_spool(self) -> bool:
        """Write spooled batches oldest first; False when the database failed meanwhile."""
        while True:
            # Batches already appended when peek runs (the spool thread is FIFO) must be
            # found by it; one that is not was damaged on disk.
            appended = [b for b in self._outstanding.values() if b.spooled]
            record = await self._io(self._spool.peek)
            if record is None:
                self._spool_records = 0
                break
            if not await self._write_record(record):
                return False
            await self._io(self._spool.ack, record)
        for batch in appended:
            if self._outstanding.pop(batch.batch_id, None) is not None:
                log.error(
                    "spool: batch %s (%d rows) was damaged on disk and is lost",
                    batch.batch_id,
                    batch.rows,
                )
                self._in_spool = max(0, self._in_spool - batch.rows)
        self._backlog = False
        self._notify()
        return True

    async def _write_record(self, record: SpoolRecord) -> bool:
        age_s = time.time() - record.created_us / 1e6
        if age_s > self._ledger_retention_s:
            log.warning(
                "spool: batch %s is %.1f days old, older than the ledger keeps ids; if it was "
                "written before, its rows are written twice",
                record.batch_id,
                age_s / 86400,
            )
        result = await self._attempt_write(
            record.batch_id, record.rows, record.data, lambda: record.data
        )
        if result is None:
            return False
        self._in_spool = max(0, self._in_spool - record.rows)
        self._spool_records = max(0, self._spool_records - 1)
        own = self._committed(record.batch_id)
        written_now, refused = result
        if written_now:
            self._replayed += record.rows - refused
            self._written += record.rows - refused
        elif own is not None:
            # Committed by an attempt whose outcome we never learned: count it now.
            self._written += record.rows
        self._notify()
        return True

    async def _write_batch(self, batch: Batch) -> bool:
        """Write one batch from memory; False if the database failed (the caller spools it)."""
        source: bytes | AsyncIterator[bytes]
        if batch.data:
            source = batch.data
        elif batch.row_list is not None:
            source = stream_copy_text(batch.row_list)
        else:
            return True  # released: the spool has the rows, and its replay writes them
        batch.writing = True
        try:
            result = await self._attempt_write(batch.batch_id, batch.rows, source, batch.encoded)
        finally:
            batch.writing = False
            batch.release_if_spooled()
        if result is None:
            return False
        if self._committed(batch.batch_id) is not None:
            self._written += batch.rows - result[1]
        self._notify()
        return True
