"""The batches a writer has formed and not yet committed: in memory, in flight, or in the spool.

A batch is born when rows leave the buffer (at most ``max_batch_rows``), is made durable in the
spool when the database cannot take it (or when too many rows wait in memory), and retires
when the table has it. The watermark, the oldest row not yet committed, is what ``flush``
waits on. Spool work runs on one worker thread, in order; the counters are only ever touched
on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from orderbook_store.pg.copy_in import MAX_ROW_BYTES, encode_copy_text
from orderbook_store.quote import QuoteRow
from orderbook_store.settings import Settings
from orderbook_store.write.spool import Spool, SpoolError
from orderbook_store.write.spool_dirs import target_directory

__all__ = ["Batch", "BatchBook"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(slots=True, eq=False)
class Batch:
    """Rows taken from the buffer together; ``first_seq`` orders it among all added rows."""

    batch_id: uuid.UUID
    first_seq: int
    rows: int
    row_list: list[QuoteRow] | None = None  # until encoded
    data: bytes = b""  # COPY text, once encoded (for the spool, or from it)
    spooled: bool = False  # set on the event loop's thread once the spool has it
    appended: bool = False  # set on the spool thread once appended (it can be asked twice)
    writing: bool = False  # a write from memory is using the rows

    def encoded(self) -> bytes:
        if not self.data:
            if self.row_list is None:
                raise RuntimeError(f"batch {self.batch_id}: its rows were released")
            self.data = encode_copy_text(self.row_list)
            self.row_list = None
        return self.data

    def release_if_spooled(self) -> None:
        """Drop the rows from memory once the spool has them and no write is reading them:
        during a long outage, memory holds only what is not yet durable."""
        if self.spooled and not self.writing:
            self.row_list = None
            self.data = b""


class BatchBook:
    """The batches of one writer and the spool that keeps them; the writer builds on it."""

    def __init__(self, settings: Settings) -> None:
        self._batch_size = settings.batch_size
        self._max_pending = max(settings.max_pending, settings.batch_size)
        #: Both bounds as one row count: no row encodes to more than MAX_ROW_BYTES.
        self._max_batch_rows = max(
            1, min(settings.max_batch_rows, settings.max_batch_bytes // MAX_ROW_BYTES)
        )
        self.spool_dir = target_directory(
            settings.spool_dir, settings.host, settings.port, settings.name
        )
        self._spool = Spool(self.spool_dir)
        self._spool_ok = False
        #: Why the spool last refused a batch; None while it takes them.
        self._spool_error: str | None = None
        self._io_pool: ThreadPoolExecutor | None = None

        self._pending: list[QuoteRow] = []
        self._taken = 0  # rows moved out of _pending into batches
        self._outstanding: dict[uuid.UUID, Batch] = {}  # formed, not yet committed, in order
        #: Rows of outstanding batches that are in memory only (not in the spool).
        self._unsafe_rows = 0
        #: ``add`` takes its slow path once this many rows are pending (see _update_spill_at).
        self._spill_at = self._max_pending
        self._unspooled: deque[Batch] = deque()  # spill failed: kept in memory
        self._spills: set[asyncio.Future[None]] = set()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        #: True until the records found in the spool at start have been replayed: ``flush``
        #: waits for them too (they are older than anything added here).
        self._backlog = True
        self._spooled = 0
        self._in_spool = 0
        #: Records believed to be in the spool: lets a cycle skip the spool thread (a GIL
        #: round trip that costs milliseconds under load) when there is nothing to replay.
        self._spool_records = 0

    def _watermark(self) -> int:
        """Sequence number of the oldest row not yet committed (rows before it all are)."""
        if self._backlog:
            return -1
        for batch in self._outstanding.values():
            return batch.first_seq
        return self._taken

    def _notify(self) -> None:
        """Wake every waiting ``flush`` whose rows are committed (or all, with ``everyone``)."""
        if not self._waiters:
            return
        mark = self._watermark()
        for target, waiter in self._waiters:
            if target <= mark and not waiter.done():
                waiter.set_result(None)

    def _wake_all_waiters(self) -> None:
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _update_spill_at(self) -> None:
        self._spill_at = max(self._batch_size, self._max_pending - self._unsafe_rows)

    def _take(self) -> Batch:
        """The oldest pending rows (at most ``max_batch_rows``) as a new outstanding batch."""
        rows = self._pending
        if len(rows) > self._max_batch_rows:
            self._pending = rows[self._max_batch_rows :]
            rows = rows[: self._max_batch_rows]
        else:
            self._pending = []
        batch = Batch(uuid.uuid4(), self._taken, len(rows), rows)
        self._taken += len(rows)
        self._outstanding[batch.batch_id] = batch
        self._unsafe_rows += batch.rows
        self._update_spill_at()
        return batch

    def _take_all(self) -> list[Batch]:
        batches = []
        while self._pending:
            batches.append(self._take())
        return batches

    def _committed(self, batch_id: uuid.UUID) -> Batch | None:
        """Retire an outstanding batch the table now has; returns it (None if not ours)."""
        batch = self._outstanding.pop(batch_id, None)
        if batch is not None and not batch.spooled:
            self._unsafe_rows -= batch.rows
            self._update_spill_at()
        return batch

    def _mark_spooled(self, batch: Batch) -> None:
        """On the loop's thread, once the spool has ``batch`` durably."""
        if batch.spooled:
            return
        batch.spooled = True
        batch.release_if_spooled()
        self._spooled += batch.rows
        self._in_spool += batch.rows
        self._spool_records += 1
        if batch.batch_id in self._outstanding:
            self._unsafe_rows -= batch.rows
            self._update_spill_at()
        with contextlib.suppress(ValueError):
            self._unspooled.remove(batch)
        if self._spool_error is not None:
            log.info("spool: takes batches again (%s)", self.spool_dir)
            self._spool_error = None

    def _spool_refused(self, batch: Batch, error: BaseException) -> None:
        if self._spool_error is None:
            log.error(
                "spool: cannot store %d row(s) (%s); keeping them in memory (at most "
                "DB_MAX_PENDING=%d rows, then add() refuses quotes)",
                batch.rows,
                error,
                self._max_pending,
            )
        self._spool_error = str(error)
        if batch not in self._unspooled:
            self._unspooled.append(batch)

    async def _io(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run ``fn`` on the single spool thread (FIFO: spool operations keep their order)."""
        assert self._io_pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._io_pool, fn, *args)

    def _spool_write(self, batch: Batch) -> None:
        """On the spool thread: encode if needed, append (durable when this returns).

        A batch can be queued twice (the flusher and a ``flush`` both making it durable); the
        second finds it appended, its rows perhaps already released, and has nothing to do.
        """
        if batch.appended:
            return
        data = batch.encoded()
        if not self._spool_ok:
            raise SpoolError(f"the spool {self.spool_dir} could not be opened")
        self._spool.append(batch.batch_id, batch.rows, data)
        batch.appended = True

    def _spilled(self, batch: Batch, future: asyncio.Future[None]) -> None:
        self._spills.discard(future)
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            self._mark_spooled(batch)
        else:
            self._spool_refused(batch, error)

    def _spill(self) -> None:
        """Move every pending row to the spool, from the worker thread; returns at once."""
        for batch in self._take_all():
            future = asyncio.ensure_future(self._io(self._spool_write, batch))
            self._spills.add(future)
            future.add_done_callback(functools.partial(self._spilled, batch))

    async def _spool_batch(self, batch: Batch) -> bool:
        """Put one batch in the spool and wait for it; False (and kept in memory) on failure."""
        if batch.spooled:
            return True
        try:
            await self._io(self._spool_write, batch)
        except SpoolError as exc:
            self._spool_refused(batch, exc)
            return False
        self._mark_spooled(batch)
        return True

    async def _make_durable(self) -> bool:
        """Spool every row not yet committed that is only in memory; True if all made it.

        That includes a batch in flight: if its write commits after all, the copy in the
        spool is recognised by the ledger when replayed.
        """
        if self._spills:
            await asyncio.gather(*self._spills, return_exceptions=True)
        self._take_all()
        for batch in list(self._outstanding.values()):
            if not batch.spooled:
                await self._spool_batch(batch)
        return not self._unspooled

    def _spool_opened(self, opening: asyncio.Future[tuple[int, int]]) -> None:
        if opening.cancelled():
            return
        error = opening.exception()
        if error is not None:
            self._backlog = False
            self._spool_error = str(error)
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
