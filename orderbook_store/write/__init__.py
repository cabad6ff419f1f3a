"""The write path behind ``OrderbookRepository.add``: buffer, group-commit COPY, retry, spool.

Modules: ``writer`` (the buffer, flush, close and the background cycle), ``batches`` (the
batches held until committed), ``attempts`` (one write attempt and the retry schedule),
``transactions`` (a batch with its ledger entry), ``careful`` (smaller statements, refused rows
bisected out), ``failures`` (what a failure means), ``spool``, ``spool_records`` and
``spool_dirs`` (batches the database has not taken), ``dead_letters`` (rows it refused),
``stats`` and ``commit_times`` (what the writer reports; ``orderbook_store.metrics`` exports it).

How a quote travels
    ``add()`` validates the quote (``quote.to_row``, about a microsecond), appends the row to an
    in-memory list and returns. It never awaits the database. One background task takes the
    pending rows (up to the batch bounds below) whenever ``batch_size`` rows are waiting or
    ``flush_interval_s`` has passed, encodes them as COPY text and writes them in one
    transaction: ``COPY orderbook_data FROM STDIN`` plus one row in the ledger table
    ``orderbook_write_batches`` carrying the batch's id. While that write is in flight new
    rows keep collecting, and the next write takes them all (group commit): batches grow with
    the load and the per-transaction cost is shared.

When a write fails
    the failure is classified (:mod:`orderbook_store.write.failures`) and handled by its class:

    * *passing* (lost connection, server restart or failover, full pool, no answer): the
      batch goes to the durable disk spool (:mod:`orderbook_store.write.spool`) under its id, and so
      does every batch formed until the server answers again. Retries back off exponentially
      (capped, with jitter). Once a write succeeds the spool is replayed in order before
      anything newer, so rows reach the table in the order they were added (one exception: a
      batch whose write fails while newer rows had already overflowed to the spool is
      replayed after them). A process that died (even by SIGKILL) leaves its spool behind;
      the next writer on the same database adopts and replays it at its start, and a running
      writer looks for such leftovers hourly.
    * *too big* (statement or lock timeout): the batch is written again at once, in the same
      transaction as smaller COPY statements, each half of one that timed out, until they
      fit. The writer remembers the size that fit for the next batches.
    * *rows refused* (data exception or integrity violation: a CHECK a DBA added, a character
      the database encoding cannot store): the batch is written again at once, bisected under
      savepoints until each refused row is found; every other row is written and each refused
      row goes to the dead-letter file beside the spool with the server's reason
      (:mod:`orderbook_store.write.dead_letters`), one log line per batch. Nothing waits behind it.
    * *configuration* (password, privileges, missing schema, unknown database, TLS, read-only
      node): the rows are kept as for a passing failure and retried every
      ``config_retry_s``; ``flush()`` raises :class:`~orderbook_store.errors.WritesBlocked`
      naming the cause and the fix, ``stats()`` carries it, and ``writes_blocked`` has it for
      a cheap check. Fixing the cause lets the kept rows through without a restart.

Bounds
    A batch (and so a spool record) holds at most ``max_batch_rows`` rows and at most
    ``max_batch_bytes`` bytes of COPY text (``pg.copy_in.MAX_ROW_BYTES`` per row at worst).

Exactly once
    The ledger insert and the rows share one transaction, and the ledger insert comes first
    with ``ON CONFLICT DO NOTHING``: a replayed batch whose id is already there was committed
    before (its COMMIT outcome was unknown when the connection broke) and is skipped. Ledger
    entries older than ``ledger_retention_s`` (default 7 days) are pruned about once an hour;
    a spool record older than that is still replayed, with a warning.

Memory
    At most ``max_pending`` rows wait in memory: beyond that they are moved to the spool by a
    worker thread (never dropped, never blocking the event loop). Should the disk fall behind
    by another ``max_pending`` rows, ``add`` awaits it (the disk, never the database). When the
    spool is unusable, ``add`` raises :class:`~orderbook_store.errors.WriterBackpressure`
    instead of taking the quote, so memory stays bounded and the caller knows. ``add`` yields
    to the event loop once every ``_YIELD_EVERY_ROWS`` calls while a batch is ready, so a
    caller adding in a tight loop still lets the write progress.

Contracts
    An ``add()`` that returned has its row written by the time ``close()`` returns, or kept in
    the spool; once ``close()`` has begun, ``add()`` raises
    :class:`~orderbook_store.errors.WriterClosed`. ``flush(timeout_s=None)`` returns once
    every row added before the call is committed (the first flush of a writer also waits for
    what it adopted from the spool). With a timeout that passes first it makes all those rows
    durable in the spool and raises ``DatabaseUnavailable`` saying so; they are written when
    the server is back (by this writer, or at the next start). ``close(timeout_s)`` flushes
    with that timeout, stops the task and releases the spool; rows not written in time stay
    in the spool and one log line says how many and where. ``close`` raises
    :class:`~orderbook_store.errors.WritesBlocked` when a configuration failure kept rows from
    the table, and :class:`~orderbook_store.errors.RowsLost` with the count when rows could be
    neither written nor spooled; it never raises for a server that is merely unreachable.
"""
