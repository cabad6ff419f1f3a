"""The write path behind ``OrderbookRepository.add``: buffer, group-commit COPY, retry, spool.

How a quote travels
    ``add()`` validates the quote (``quote.to_row``, about a microsecond), appends the row to an
    in-memory list and returns. It never awaits the database. One background task takes *all*
    pending rows whenever ``batch_size`` rows are waiting or ``flush_interval_s`` has passed,
    encodes them as COPY text and writes them in one transaction: ``COPY orderbook_data FROM
    STDIN`` plus one row in the ledger table ``orderbook_write_batches`` carrying the batch's
    id. While that write is in flight new rows keep collecting, and the next write takes them
    all (group commit): batches grow with the load and the per-transaction cost is shared.

When the database cannot take a batch
    (lost connection, server restart or failover, full pool, timeout) the batch goes to the
    durable disk spool (:mod:`orderbook_store.spool`) under its id, and so does every batch
    formed until the server answers again. Retries back off exponentially (capped, with
    jitter); meanwhile what is pending is spooled every ``flush_interval_s``. Once a write
    succeeds the spool is replayed in order before anything newer, so rows reach the table in
    the order they were added (one exception: a batch whose write fails while newer rows had
    already overflowed to the spool is replayed after them). A process that died (even by
    SIGKILL) leaves its spool behind; the next writer on the same database adopts and replays
    it at its start, and a running writer looks for such leftovers hourly.

Exactly once
    The ledger insert and the rows share one transaction, and the ledger insert comes first
    with ``ON CONFLICT DO NOTHING``: a replayed batch whose id is already there was committed
    before (its COMMIT outcome was unknown when the connection broke) and is skipped. Ledger
    entries older than ``ledger_retention_s`` (default 7 days) are pruned about once an hour;
    a spool record older than that is still replayed, with a warning.

Memory
    At most ``max_pending`` rows wait in memory: beyond that they are moved to the spool by a
    worker thread (never dropped, never blocking the event loop). ``add`` yields to the event
    loop once every ``_YIELD_EVERY_ROWS`` calls while a batch is ready, so a caller adding in a
    tight loop still lets the write progress.

Contracts
    ``flush(timeout_s=None)`` returns once every row added before the call is committed (the
    first flush of a writer also waits for what it adopted from the spool). With a
    timeout that passes first it makes all those rows durable in the spool and raises
    ``DatabaseUnavailable`` saying so; they are written when the server is back (by this
    writer, or at the next start). ``close(timeout_s)`` flushes with that timeout, stops the
    task and releases the spool; whatever could not be written stays in the spool and one log
    line says how much and where. ``close`` never raises for an unreachable server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy import bindparam, delete, func
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .copy_encode import COPY_COLUMNS, encode_copy_text
from .errors import DatabaseUnavailable, InvalidQuote, OrderbookStoreError
from .models import OrderbookData, WriteBatch
from .quote import Quote, QuoteRow, to_row
from .settings import Settings
from .spool import Spool, SpoolError, SpoolRecord, default_spool_dir, target_dirname

__all__ = ["Writer", "WriterStats", "copy_rows"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: While a batch is ready, ``add`` gives the event loop a turn once per this many calls, so a
#: producer that never awaits anything else cannot starve the write in flight.
_YIELD_EVERY_ROWS = 256
#: Latencies kept for the p50/p99 in ``stats()``.
_LATENCY_WINDOW = 1024
#: Rows encoded per COPY data message when a batch is streamed from memory.
_COPY_CHUNK_ROWS = 4096
#: How often (seconds) the ledger is pruned and the spool directory looked at for batches
#: left by writers that stopped while this one runs.
_PRUNE_EVERY_S = 3600.0

_TABLE = OrderbookData.__tablename__

_LEDGER_INSERT = (
    pg_insert(WriteBatch)
    .values(batch_id=bindparam("batch_id"), rows=bindparam("rows"))
    .on_conflict_do_nothing(index_elements=[WriteBatch.batch_id])
    .returning(WriteBatch.batch_id)
)
_LEDGER_PRUNE = delete(WriteBatch).where(
    WriteBatch.committed_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, bindparam("secs"))
)


@dataclass(frozen=True, slots=True)
class WriterStats:
    """A snapshot of the writer's counters (rows unless named otherwise).

    ``rows_written`` counts rows this writer committed (directly or from the spool);
    ``rows_replayed`` the part of them that came back from the spool, including batches
    adopted from a writer that stopped; ``rows_spooled`` rows this writer put in the spool;
    ``retries`` failed write attempts that were retried; ``batches`` committed transactions.
    Latencies are of one batch's write (pool checkout, COPY, commit), in seconds.
    """

    rows_added: int
    rows_written: int
    rows_spooled: int
    rows_replayed: int
    rows_rejected: int
    rows_pending: int
    rows_in_spool: int
    retries: int
    batches: int
    last_flush_latency_s: float | None
    flush_latency_p50_s: float | None
    flush_latency_p99_s: float | None

    def as_dict(self) -> dict[str, int | float | None]:
        """The fields as a plain dict (what the log lines carry)."""
        return asdict(self)


@dataclass(slots=True, eq=False)
class _Batch:
    """Rows taken from the buffer together; ``first_seq`` orders it among all added rows."""

    batch_id: uuid.UUID
    first_seq: int
    rows: int
    row_list: list[QuoteRow] | None = None  # until encoded
    data: bytes = b""  # COPY text, once encoded (for the spool, or from it)
    spooled: bool = False

    def encoded(self) -> bytes:
        if not self.data and self.row_list is not None:
            self.data = encode_copy_text(self.row_list)
            self.row_list = None
        return self.data


def _percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


async def copy_rows(conn: AsyncConnection, data: bytes | AsyncIterable[bytes]) -> None:
    """COPY ``data`` (COPY text of ``copy_encode.COPY_COLUMNS``) into the table on ``conn``.

    ``data`` is bytes or an async iterable of bytes. Runs inside ``conn``'s transaction, which
    must already have begun (execute something first: the asyncpg dialect begins lazily).
    """
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    # A memoryview, because asyncpg would take plain bytes for a file *path*.
    source = memoryview(data) if isinstance(data, bytes) else data
    await raw.copy_to_table(_TABLE, source=source, columns=list(COPY_COLUMNS), format="text")


class Writer:
    """Buffered, group-committing, spooling writer for one engine. See the module docstring.

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
        ledger_retention_s: float = 7 * 86400.0,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._batch_size = settings.batch_size
        self._flush_interval_s = settings.flush_interval_s
        self._max_pending = max(settings.max_pending, settings.batch_size)
        self._write_timeout_s = write_timeout_s
        self._close_timeout_s = close_timeout_s
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        self._ledger_retention_s = ledger_retention_s
        root = settings.spool_dir if settings.spool_dir is not None else default_spool_dir()
        self.spool_dir = Path(root).expanduser() / target_dirname(
            settings.host, settings.port, settings.name
        )
        self._spool = Spool(self.spool_dir)
        self._spool_ok = False
        self._io_pool: ThreadPoolExecutor | None = None

        self._pending: list[QuoteRow] = []
        self._taken = 0  # rows moved out of _pending into batches
        self._outstanding: dict[uuid.UUID, _Batch] = {}  # formed, not yet committed, in order
        self._unspooled: deque[_Batch] = deque()  # spill failed: kept in memory
        self._in_flight: _Batch | None = None
        self._spills: set[asyncio.Future[None]] = set()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closing = False
        self._closed = False
        self._attempt = 0
        self._retry_at = 0.0
        self._last_error = ""
        self._last_prune = float("-inf")
        #: True until the records found in the spool at start have been replayed: ``flush``
        #: waits for them too (they are older than anything added here).
        self._backlog = True

        self._rejected = 0
        self._written = 0
        self._spooled = 0
        self._replayed = 0
        self._retries = 0
        self._batches = 0
        self._in_spool = 0
        #: Records believed to be in the spool: lets a cycle skip the spool thread (a GIL
        #: round trip that costs milliseconds under load) when there is nothing to replay.
        self._spool_records = 0
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)

    # -- the hot path ---------------------------------------------------------------------

    async def add(self, quote: Quote | Mapping[str, object]) -> None:
        """Validate ``quote`` and buffer it; returns at once, never awaiting the database.

        Raises ``InvalidQuote`` for a quote that breaks a rule (nothing else is affected).
        """
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
            and (n == self._batch_size or not n % _YIELD_EVERY_ROWS or n >= self._max_pending)
        ) or self._task is None:
            await self._batch_ready(n)

    async def add_many(self, quotes: Iterable[Quote | Mapping[str, object]]) -> int:
        """``add`` each quote; returns how many were buffered.

        Every valid quote is buffered; if some were invalid, the first ``InvalidQuote`` is
        raised after the others are in (``stats().rows_rejected`` counts them all).
        """
        first_error: InvalidQuote | None = None
        accepted = 0
        pending = self._pending
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
                n == self._batch_size or not n % _YIELD_EVERY_ROWS or n >= self._max_pending
            ):
                await self._batch_ready(n)
                pending = self._pending
        if self._task is None or len(pending) >= self._batch_size:
            await self._batch_ready(len(pending))
        if first_error is not None:
            raise first_error
        return accepted

    async def _batch_ready(self, n: int) -> None:
        if self._task is None:
            if self._closed:
                self._pending.clear()  # only the row just added: the rest was handled by close
                raise OrderbookStoreError("the writer is closed; make a new OrderbookRepository")
            self._start()
            if n < self._batch_size:
                return
        wake = self._wake
        assert wake is not None
        if not wake.is_set():
            wake.set()
        if n >= self._max_pending:
            self._spill()
        elif not n % _YIELD_EVERY_ROWS:
            await asyncio.sleep(0)

    # -- life cycle -------------------------------------------------------------------------

    def _start(self) -> None:
        if self._closed:
            raise OrderbookStoreError("the writer is closed; make a new OrderbookRepository")
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
        as soon as the server answers (by this writer or, after a stop, the next one).
        """
        target = self._taken + len(self._pending)
        self._start()
        if self._watermark() >= target:
            return
        assert self._wake is not None
        self._wake.set()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, waiter))
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except asyncio.TimeoutError:
            left = target - self._watermark()
            durable = await self._make_durable()
            raise DatabaseUnavailable(
                f"flush: {left} row(s) not committed within {timeout_s:g} s "
                f"({self._last_error or 'the database is slow'}); "
                + (
                    f"they are safe in the spool {self.spool_dir} and are written when the "
                    "server answers"
                    if durable
                    else "the spool is unavailable too, so they are held in memory only"
                )
            ) from None
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove((target, waiter))

    async def close(self, timeout_s: float | None = None) -> None:
        """Flush (up to ``timeout_s``, default 30 s), stop, and leave the rest in the spool."""
        if self._closed:
            return
        timeout = self._close_timeout_s if timeout_s is None else timeout_s
        self._closing = True
        try:
            if self._task is not None or self._pending:
                with contextlib.suppress(DatabaseUnavailable):
                    await self.flush(timeout)
        finally:
            self._closed = True
            await self._shutdown()
            self._task = None

    async def _shutdown(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._io_pool is not None:
            # Whatever the task left uncommitted (a write cut short, rows added meanwhile).
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
                "(%s); %s",
                lost,
                self._last_error,
                _fields(stats),
                extra={"orderbook_store": stats.as_dict()},
            )
        elif left_rows or left_batches:
            log.warning(
                "writer closed: %d row(s) in %d batch(es) not written within the close "
                "timeout stay in the spool %s and are written at the next start (%s); %s",
                left_rows,
                left_batches,
                self.spool_dir,
                self._last_error or "database slow",
                _fields(stats),
                extra={"orderbook_store": stats.as_dict()},
            )
        else:
            log.info(
                "writer closed: everything written; %s",
                _fields(stats),
                extra={"orderbook_store": stats.as_dict()},
            )

    # -- stats ----------------------------------------------------------------------------

    def stats(self) -> WriterStats:
        """Counters and flush latencies (cheap: no I/O)."""
        latencies = sorted(self._latencies)
        return WriterStats(
            rows_added=self._taken + len(self._pending),
            rows_written=self._written,
            rows_spooled=self._spooled,
            rows_replayed=self._replayed,
            rows_rejected=self._rejected,
            rows_pending=len(self._pending) + sum(b.rows for b in self._unspooled),
            rows_in_spool=self._in_spool,
            retries=self._retries,
            batches=self._batches,
            last_flush_latency_s=self._latencies[-1] if self._latencies else None,
            flush_latency_p50_s=_percentile(latencies, 0.5) if latencies else None,
            flush_latency_p99_s=_percentile(latencies, 0.99) if latencies else None,
        )

    # -- bookkeeping ------------------------------------------------------------------------

    def _watermark(self) -> int:
        """Sequence number of the oldest row not yet committed (rows before it all are)."""
        if self._backlog:
            return -1
        for batch in self._outstanding.values():
            return batch.first_seq
        return self._taken

    def _notify(self) -> None:
        if not self._waiters:
            return
        mark = self._watermark()
        for target, waiter in self._waiters:
            if target <= mark and not waiter.done():
                waiter.set_result(None)

    def _take(self) -> _Batch:
        rows = self._pending
        self._pending = []
        batch = _Batch(uuid.uuid4(), self._taken, len(rows), rows)
        self._taken += len(rows)
        self._outstanding[batch.batch_id] = batch
        return batch

    async def _io(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run ``fn`` on the single spool thread (FIFO: spool operations keep their order)."""
        assert self._io_pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._io_pool, fn, *args)

    def _spool_write(self, batch: _Batch) -> None:
        """On the spool thread: encode if needed, append, mark durable."""
        data = batch.encoded()
        if not self._spool_ok:
            raise SpoolError(f"the spool {self.spool_dir} could not be opened")
        self._spool.append(batch.batch_id, batch.rows, data)
        batch.spooled = True

    def _spilled(self, batch: _Batch, future: asyncio.Future[None]) -> None:
        self._spills.discard(future)
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            self._spooled += batch.rows
            self._in_spool += batch.rows
            self._spool_records += 1
            return
        log.error(
            "spool: cannot store %d row(s) (%s); keeping them in memory",
            batch.rows,
            error,
        )
        self._unspooled.append(batch)

    def _spill(self) -> None:
        """Move every pending row to the spool, from the worker thread; returns at once."""
        batch = self._take()
        future = asyncio.ensure_future(self._io(self._spool_write, batch))
        self._spills.add(future)
        future.add_done_callback(lambda f: self._spilled(batch, f))

    async def _spool_batch(self, batch: _Batch) -> bool:
        """Put one batch in the spool and wait for it; False (and kept in memory) on failure."""
        if batch.spooled:
            return True
        try:
            await self._io(self._spool_write, batch)
        except SpoolError as exc:
            log.error("spool: cannot store %d row(s) (%s); keeping them in memory", batch.rows, exc)
            if batch not in self._unspooled:
                self._unspooled.append(batch)
            return False
        with contextlib.suppress(ValueError):
            self._unspooled.remove(batch)
        self._spooled += batch.rows
        self._in_spool += batch.rows
        self._spool_records += 1
        return True

    async def _make_durable(self) -> bool:
        """Spool every row not yet committed that is only in memory; True if all made it.

        That includes a batch in flight: if its write commits after all, the copy in the
        spool is recognised by the ledger when replayed.
        """
        if self._spills:
            await asyncio.gather(*self._spills, return_exceptions=True)
        if self._pending:
            self._take()
        for batch in list(self._outstanding.values()):
            if not batch.spooled:
                await self._spool_batch(batch)
        return not self._unspooled

    # -- the background task ----------------------------------------------------------------

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            if self._attempt:
                # Failing: no hurry for full batches (they are spooled, one fsync each); wake
                # for the retry or to spool what the interval collected.
                remaining = self._retry_at - time.monotonic()
                await asyncio.sleep(max(0.0, min(self._flush_interval_s, remaining)))
            elif not wake.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), self._flush_interval_s)
            wake.clear()
            try:
                await self._cycle()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the writer; the rows are still held
                log.exception("writer: unexpected error; retrying")
                self._failed("unexpected error")

    def _spool_opened(self, opening: asyncio.Future[tuple[int, int]]) -> None:
        if opening.cancelled():
            return
        error = opening.exception()
        if error is not None:
            self._backlog = False
            log.error("spool unavailable (%s): batches the database refuses stay in memory", error)
        else:
            records, rows = opening.result()
            self._spool_records += records
            self._in_spool += rows
            if not records:
                self._backlog = False
        self._notify()

    def _close_spool(self) -> None:
        if self._spool_ok:
            self._spool_ok = False
            self._spool.close()

    def _adopt_orphans(self) -> tuple[int, int]:
        """On the spool thread: take over what writers that died since our start left.

        Returns the records and rows gained (counters are updated on the loop's thread).
        """
        records, rows = self._spool.pending_records, self._spool.pending_rows
        if not self._spool.adopt_orphans():
            return 0, 0
        return self._spool.pending_records - records, self._spool.pending_rows - rows

    def _open_spool(self) -> tuple[int, int]:
        """On the spool thread: open, adopt; returns the records and rows found waiting."""
        self._spool.open()
        self._spool_ok = True
        return self._spool.pending_records, self._spool.pending_rows

    def _failed(self, reason: str) -> None:
        self._attempt += 1
        self._retries += 1
        self._last_error = reason
        ceiling = min(self._retry_cap_s, self._retry_base_s * 2 ** min(self._attempt - 1, 30))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        self._retry_at = time.monotonic() + delay
        stats = self.stats()
        log.warning(
            "write failed (attempt %d, retrying in %.2f s): %s; %s",
            self._attempt,
            delay,
            reason,
            _fields(stats),
            extra={"orderbook_store": stats.as_dict()},
        )

    def _succeeded(self) -> None:
        if self._attempt:
            log.info(
                "database reachable again after %d failed attempt(s); %d row(s) in the spool "
                "are replayed first",
                self._attempt,
                self._in_spool,
            )
        self._attempt = 0
        self._last_error = ""

    async def _cycle(self) -> None:
        """One round: replay the spool in order, then write everything pending."""
        if self._attempt and time.monotonic() < self._retry_at:
            # The database is failing: make what is pending durable while we wait.
            if self._pending:
                await self._spool_batch(self._take())
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
            self._unspooled.popleft()
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
        result = await self._attempt_write(record.batch_id, record.rows, record.data)
        if result is None:
            return False
        self._in_spool = max(0, self._in_spool - record.rows)
        self._spool_records = max(0, self._spool_records - 1)
        own = self._outstanding.pop(record.batch_id, None)
        if result:
            self._replayed += record.rows
            self._written += record.rows
        elif own is not None:
            # Committed by an attempt whose outcome we never learned: count it now.
            self._written += record.rows
        self._notify()
        return True

    async def _write_batch(self, batch: _Batch) -> bool:
        """Write one batch from memory; False if the database failed (the caller spools it)."""
        source = batch.data or _chunked(batch.row_list or [])
        result = await self._attempt_write(batch.batch_id, batch.rows, source)
        if result is None:
            return False
        if self._outstanding.pop(batch.batch_id, None) is not None:
            self._written += batch.rows
        self._notify()
        return True

    async def _attempt_write(
        self, batch_id: uuid.UUID, rows: int, data: bytes | AsyncIterator[bytes]
    ) -> bool | None:
        """True: written now; False: already in the ledger; None: failed (retry scheduled)."""
        started = time.perf_counter()
        try:
            written = await asyncio.wait_for(
                self._transaction(batch_id, rows, data), self._timeout_for(rows)
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(self._describe(exc))
            return None
        self._latencies.append(time.perf_counter() - started)
        self._succeeded()
        if written:
            self._batches += 1
        return written

    async def _transaction(
        self, batch_id: uuid.UUID, rows: int, data: bytes | AsyncIterator[bytes]
    ) -> bool:
        async with self._engine.connect() as conn:
            try:
                async with conn.begin():
                    inserted = await conn.execute(
                        _LEDGER_INSERT, {"batch_id": batch_id, "rows": rows}
                    )
                    if inserted.first() is None:
                        return False
                    await copy_rows(conn, data)
                return True
            except BaseException:
                # The connection may be broken mid-protocol: never hand it back to the pool.
                with contextlib.suppress(Exception):
                    await conn.invalidate()
                raise

    async def _prune_ledger(self) -> None:
        self._last_prune = time.monotonic()
        try:
            async with self._engine.begin() as conn:
                result = await conn.execute(_LEDGER_PRUNE, {"secs": self._ledger_retention_s})
        except Exception as exc:
            log.warning("ledger prune failed (%s); retried in an hour", self._describe(exc))
            return
        if result.rowcount:
            log.info(
                "ledger: pruned %d entries older than %.0f s",
                result.rowcount,
                self._ledger_retention_s,
            )

    def _timeout_for(self, rows: int) -> float:
        """The write timeout, stretched for big batches (allowing 10,000 rows/s), so a large
        batch on a slow link is not cut off, retried and cut off again forever."""
        return self._write_timeout_s + rows / 10_000

    def _describe(self, exc: BaseException) -> str:
        """One line about a failure and what caused it, never containing the password."""
        parts: list[str] = []
        seen: BaseException | None = exc
        while seen is not None and len(parts) < 3:
            if isinstance(seen, asyncio.TimeoutError):
                parts.append(f"no answer within the write timeout ({self._write_timeout_s:g} s+)")
            else:
                first = str(seen).strip().splitlines()
                name = type(seen).__name__
                parts.append(f"{name}: {first[0]}" if first else name)
            seen = seen.__cause__ or seen.__context__
        text = " <- ".join(parts)
        secret = self._settings.password
        if secret is not None and secret.get_secret_value():
            text = text.replace(secret.get_secret_value(), "***")
        return text[:300]


async def _chunked(rows: list[QuoteRow]) -> AsyncIterator[bytes]:
    """COPY text of ``rows`` in pieces, so the server inserts while the rest is encoded.

    Between pieces the event loop gets a turn: a big batch never holds up ``add`` callers
    (or the collector's websocket) for longer than one piece takes to encode.
    """
    for start in range(0, len(rows), _COPY_CHUNK_ROWS):
        if start:
            await asyncio.sleep(0)
        yield encode_copy_text(rows[start : start + _COPY_CHUNK_ROWS])


def _fields(stats: WriterStats) -> str:
    values = stats.as_dict()
    return " ".join(
        f"{key}={value:.6f}" if isinstance(value, float) else f"{key}={value}"
        for key, value in values.items()
    )
