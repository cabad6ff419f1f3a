"""The read path: symbol + time range -> columns, as pandas, polars, Arrow or numpy.

How a range read works, and why:

* One ``COPY (SELECT ...) TO STDOUT`` per symbol, in text format, decoded on the client by
  ``pg.copy_out`` (vectorized numpy). The server sends ``numeric`` as stored (its text form is as
  cheap to produce as binary) instead of casting to ``float8``, which is what bounds connectorx
  and ``read_sql``; floats come out exactly ``float(Decimal(stored value))``.
* COPY cannot take bind parameters, and user strings never become SQL text here: the symbol
  and exchange are *bound* to ``set_config(..., is_local => true)`` in the same read-only
  transaction, and the COPY query reads them back with ``current_setting(...)``. Those are
  stable expressions, so they still drive ``idx_orderbook_symbol_timestamp`` as index
  conditions. The time bounds are validated Python ``int``s and are
  written as integer literals: that lets the planner prune date partitions at plan time
  instead of planning every partition and pruning at run time.
* Rows come in index order (symbol, timestamp). Equal timestamps come in heap order, which is
  nearly always id order; the client checks, and re-sorts by (timestamp, id) only when needed.
  That spares the server an Incremental Sort (~15% of its time).
* Each COPY streams: batches of about 2 MB are decoded while the server is still sending, so
  the client's decoding overlaps the server's work on the other core.
* A read the planner expects to hold ``parallel_min_rows`` rows or more is cut at a timestamp
  boundary and read on two pooled connections at once; the second joins the first one's
  transaction snapshot (``pg_export_snapshot``/``SET TRANSACTION SNAPSHOT``), so both see the
  same rows. On a standby, with a busy pool, or when the second connection reaches another
  server, the first connection simply reads everything. Rows stored in symbol order (compacted
  partitions, see ``read.clustering``) are read on one connection: the server's per-row work is
  then no longer the limit, and a second connection only competes with the decoder for CPU.

Tiers: ranges whose partitions were archived to the lake and dropped (``orderbook_lake_ranges``,
``dropped_at`` set) are read from the lake's Parquet files, the rest from PostgreSQL, and merged
by (timestamp, id); rows written late for a dropped range come from the default partition. The
read's transaction locks the table before its snapshot (``read.snapshot``) and asks the catalog
(``read.tiers``): one small query, all it costs without dropped ranges. Lake files are read on a
worker thread while PostgreSQL streams (``read.lake_reader``); ``latest``/``asof`` ask the lake
only when a dropped range can hold a later quote than PostgreSQL's (``read.lake_probes``);
``resample`` combines exact partial aggregates of both tiers (``read.resample_tiers``). Every
result is what the same call returned before the partitions were dropped. ``LAKE_URL`` unset
while the catalog says rows are in the lake raises ``ConfigError`` naming it and the range.

Times: ``start``/``end`` accept aware ``datetime`` (any zone), naive ``datetime`` (taken as
UTC), ISO-8601 strings (naive ones UTC), ``pandas.Timestamp``, ``numpy.datetime64`` (UTC) and
``int`` microseconds since the epoch. The range is half-open ``[start, end)``; sub-microsecond
bounds round up, which keeps it half-open on the stored microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.models import QUOTE_COLUMNS
from orderbook_store.pg.copy_out import DecodedColumn, TextColumn, TextCopyDecoder

if TYPE_CHECKING:
    import asyncpg

from orderbook_store.engine import settings_of
from orderbook_store.errors import InvalidArgument
from orderbook_store.files.lake_format import LakeFileRef
from orderbook_store.files.lake_store import Lake, open_lake
from orderbook_store.pg.connection import raw_connection
from orderbook_store.read.clustering import planned_relations, stored_in_symbol_order
from orderbook_store.read.columns import (
    _Block,
    _block_from_batches,
    _concat,
    _merge_blocks,
    _split_block,
    _take,
    _take_or_missing,
)
from orderbook_store.read.frames import _rows_to_columns, build_frame
from orderbook_store.read.hints import warn_other_case
from orderbook_store.read.lake_probes import LakeProbes
from orderbook_store.read.lake_reader import decode_table, read_lake_rows, sort_order
from orderbook_store.read.layout import prepare_probes
from orderbook_store.read.plan import (
    _BIND_SQL,
    _ESTIMATE_SQL,
    OUTPUT_FORMATS,
    READ_COLUMNS,
    Frame,
    Output,
    _bounds_sql,
    _check_exchange,
    _check_output,
    _check_symbol,
    _Part,
    _Plan,
    _symbol_list,
    plan_quotes,
)
from orderbook_store.read.probes import Probe, last_quotes, latest_of_every_symbol
from orderbook_store.read.resample_tiers import (
    PARTIALS_SQL,
    finish,
    lake_partials,
    merge_partials,
    stored_partials,
)
from orderbook_store.read.snapshot import read_snapshot
from orderbook_store.read.sql import RESAMPLE_COLUMNS, RESAMPLE_SQL
from orderbook_store.read.tiers import (
    LakeCatalog,
    LakeRangeEntry,
    lake_windows,
    require_lake,
)
from orderbook_store.settings import Settings
from orderbook_store.times import US_PER_DAY, TimeLike, parse_freq_us, to_epoch_us

_SNAPSHOT_RE = re.compile(r"^[0-9A-Fa-f]+(-[0-9A-Fa-f]+)+$")

__all__ = [
    "OUTPUT_FORMATS",
    "READ_COLUMNS",
    "Frame",
    "Output",
    "Reader",
    "TimeLike",
    "parse_freq_us",
    "to_epoch_us",
]


class Reader:
    """Range, stream, latest, as-of and resample queries on one engine.

    Every method opens one pooled connection and one read-only transaction; nothing is cached
    between calls. ``OrderbookRepository`` delegates its read methods here.
    """

    #: Bytes of COPY text decoded at a time: small enough to stay in cache and overlap with
    #: the server; large enough that numpy's per-call overhead is noise.
    batch_bytes = 2 << 20
    #: Reads the planner expects to be at least this large use two connections at once.
    parallel_min_rows = 200_000
    parallel = True
    #: How many connections the last ``quotes()`` read on (1 or 2), for diagnostics.
    last_read_connections = 0
    #: ``asof`` with at least this many times considers one range read instead of probes ...
    asof_range_min_times = 1_000
    #: ... when that range holds at most this many quotes per requested time.
    asof_range_rows_per_time = 50

    def __init__(self, engine: AsyncEngine, *, settings: Settings | None = None) -> None:
        self.engine = engine
        #: Where ``LAKE_URL`` comes from: the repository's settings, else the engine's.
        self.settings = settings if settings is not None else settings_of(engine)
        self._catalog = LakeCatalog()
        self._lake: Lake | None = None

    def _lake_for(self, entries: Sequence[LakeRangeEntry]) -> Lake | None:
        """The configured lake when ``entries`` (dropped ranges) need it; ``ConfigError``
        naming ``LAKE_URL`` and the range when they do and none is configured."""
        if not entries:
            return None
        if self._lake is None:
            self._lake = open_lake(self.settings)
        return require_lake(self._lake, entries)

    async def quotes(
        self,
        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: Output = "pandas",
        exact: bool = False,
    ) -> Frame:
        """Quotes of ``symbols`` with ``start <= timestamp < end``, ordered by symbol, time, id.

        See the module docstring for accepted times and the output types. An unknown symbol
        gives no rows; an empty result has the same columns and dtypes. Costs one COPY per
        symbol in one read-only transaction, plus the catalog query (see the module doc) and,
        for ranges in the lake, reading their files; memory is the result plus one 2 MB batch.
        """
        plan = plan_quotes(
            symbols,
            start,
            end,
            exchange=exchange,
            columns=columns,
            output=output,
            exact=exact,
        )
        return build_frame(await self._read_columns(plan), plan.output, exact=plan.exact)

    async def _read_columns(self, plan: _Plan) -> dict[str, DecodedColumn]:
        """The decoded columns of a validated range read (see ``quotes``)."""
        blocks: list[_Block] = []
        if plan.symbols:
            async with read_snapshot(self.engine) as raw:
                entries = await self._catalog.dropped(raw, plan.start_us, plan.end_us, plan.symbols)
                lake = self._lake_for(entries)
                # The lake's files are read on a worker thread while PostgreSQL streams.
                in_lake: asyncio.Future[dict[str, _Block]] | None = None
                if lake is not None:
                    in_lake = asyncio.ensure_future(
                        asyncio.to_thread(_lake_blocks, lake, entries, plan)
                    )
                try:
                    parts, rows, clustered = await self._parts(raw, plan)
                    snapshot = None
                    self.last_read_connections = 1
                    wanted = self.parallel and not clustered and rows >= self.parallel_min_rows
                    if wanted and len(parts) > 1:
                        snapshot = await _export_snapshot(raw)
                    if snapshot is not None:
                        results = await self._copy_parallel(raw, plan, parts, snapshot)
                    else:
                        results = [await self._copy_batches(raw, plan, part) for part in parts]
                    lake_blocks = {} if in_lake is None else await in_lake
                except BaseException:
                    if in_lake is not None and not in_lake.done():
                        _detach(in_lake)
                    raise
                empty = _empty_symbols(parts, results)
                await warn_other_case(raw, {s for s in empty if s not in lake_blocks})
            blocks = [
                _block_from_batches(plan, part.symbol, batches, check_order=True)
                for part, batches in zip(parts, results, strict=True)
            ]
            if lake_blocks:
                blocks = _with_lake_blocks(plan, blocks, lake_blocks)
        return _merge_blocks(plan, blocks)

    async def _parts(self, raw: asyncpg.Connection, plan: _Plan) -> tuple[list[_Part], int, bool]:
        """The COPYs to run, in output order, the planner's estimate of all rows, and whether
        those rows are stored in symbol order (``read.clustering``: one connection reads them
        best).

        A symbol whose range the planner expects to hold ``parallel_min_rows`` or more is cut
        in two at the middle of its first and last timestamps (a timestamp boundary, so equal
        timestamps never straddle two parts), unless the rows are stored in symbol order.
        """
        parts: list[_Part] = []
        total = 0
        clustered: bool | None = None
        for symbol in plan.symbols:
            args = (symbol, plan.start_us, plan.end_us, plan.exchange)
            explained = await raw.fetchval(_ESTIMATE_SQL, *args)
            # SQLAlchemy registers a json codec on its connections; plain asyncpg gives text.
            if isinstance(explained, str | bytes):
                explained = json.loads(explained)
            estimate = int(explained[0]["Plan"]["Plan Rows"])
            total += estimate
            split = self.parallel and estimate >= self.parallel_min_rows
            if split and clustered is None:
                # Every symbol's plan reads the same partitions: asked once per read.
                relations = planned_relations(explained[0]["Plan"])
                clustered = await stored_in_symbol_order(raw, relations)
            if split and not clustered:
                bounds_sql = _bounds_sql(plan.start_us, plan.end_us)
                bounds = await raw.fetchrow(bounds_sql, symbol, plan.exchange)
                first, last = bounds["first"], bounds["last"]
                if first is not None and last is not None and last > first:
                    middle = first + (last - first + 1) // 2
                    parts.append(_Part(symbol, plan.start_us, middle))
                    parts.append(_Part(symbol, middle, plan.end_us))
                    continue
            parts.append(_Part(symbol, plan.start_us, plan.end_us))
        several = self.parallel and len(parts) > 1 and total >= self.parallel_min_rows
        if clustered is None and several:
            # Several symbols, none large alone: they would go to two connections.
            relations = planned_relations(explained[0]["Plan"])
            clustered = await stored_in_symbol_order(raw, relations)
        return parts, total, bool(clustered)

    async def _copy_parallel(
        self, raw: asyncpg.Connection, plan: _Plan, parts: list[_Part], snapshot: str
    ) -> list[list[list[DecodedColumn]]]:
        """Run ``parts`` over this connection and a second one sharing its snapshot.

        Two server processes produce rows at once (the server's per-row work is the limit on a
        single connection); ``SET TRANSACTION SNAPSHOT`` makes the second read exactly what the
        first sees, so the result is one consistent picture of the table.
        """
        if not _SNAPSHOT_RE.match(snapshot):
            raise RuntimeError(f"unexpected snapshot id {snapshot!r}")
        results: list[list[list[DecodedColumn]] | None] = [None] * len(parts)
        order = iter(range(len(parts)))
        state = {"finished": False}  # the first connection is done (or failed)

        async def work(connection: asyncpg.Connection) -> None:
            for index in order:
                if state["finished"] and connection is not raw:
                    return  # the first connection failed: stop after the current part
                results[index] = await self._copy_batches(connection, plan, parts[index])

        joined = asyncio.Event()

        async def helper() -> None:
            # Never cancelled while a statement is in flight (a late cancel request could hit
            # the pooled connection's next user): once the first connection is done, it just
            # gives its connection back unused.
            async with contextlib.AsyncExitStack() as stack:
                try:
                    conn = await stack.enter_async_context(self.engine.connect())
                    if state["finished"]:
                        return
                    second = await raw_connection(conn)
                    await stack.enter_async_context(
                        second.transaction(isolation="repeatable_read", readonly=True)
                    )
                    # The id comes from the server and is checked above; SET takes no
                    # parameter.
                    await second.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
                except Exception:
                    return  # no second connection after all: the first one reads every part
                joined.set()
                self.last_read_connections = 2
                await work(second)

        first = asyncio.ensure_future(work(raw))
        second_task = asyncio.ensure_future(helper())
        try:
            await first
        except BaseException:
            state["finished"] = True
            if joined.is_set():
                await asyncio.gather(second_task, return_exceptions=True)
            else:
                _detach(second_task)
            raise
        state["finished"] = True
        if joined.is_set():
            await second_task  # it is reading parts: wait for them
        else:
            # Still waiting for a pooled connection (a busy pool): not needed any more. It
            # gives the connection back as soon as it gets one; the read does not wait.
            _detach(second_task)
        return [r if r is not None else [] for r in results]

    async def _copy_batches(
        self, raw: asyncpg.Connection, plan: _Plan, part: _Part
    ) -> list[list[DecodedColumn]]:
        decoder = TextCopyDecoder(plan.kinds, exact=plan.exact, batch_bytes=self.batch_bytes)
        batches: list[list[DecodedColumn]] = []

        async def sink(chunk: bytes) -> None:
            batches.extend(decoder.feed(chunk))

        await raw.fetchval(_BIND_SQL, *plan.bind_args(part.symbol))
        await raw.copy_from_query(
            plan.copy_sql(order_by_id=False, start_us=part.start_us, end_us=part.end_us),
            output=sink,
        )
        batches.extend(decoder.finish())
        return batches

    async def iter_quotes(
        self,
        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        chunk_rows: int = 1_000_000,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: Output = "pandas",
        exact: bool = False,
    ) -> AsyncIterator[Frame]:
        """The same rows as ``quotes()`` as frames of at most ``chunk_rows`` rows each.

        Memory stays flat however long the range: the COPY is paused (TCP back-pressure) while
        a chunk waits to be consumed, so at most one chunk, one 2 MB batch and the socket
        buffers are held. The server sorts equal timestamps by id here (a chunk cannot be
        re-sorted after it was handed out). Nothing is yielded for an unknown symbol.
        """
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise InvalidArgument(f"chunk_rows={chunk_rows!r} must be a positive integer")
        plan = plan_quotes(
            symbols,
            start,
            end,
            exchange=exchange,
            columns=columns,
            output=output,
            exact=exact,
        )
        if not plan.symbols:
            return
        async with read_snapshot(self.engine) as raw:
            entries = await self._catalog.dropped(raw, plan.start_us, plan.end_us, plan.symbols)
            lake = self._lake_for(entries)
            empty = []
            for symbol in plan.symbols:
                found = False
                batches = self._symbol_batches(raw, plan, symbol, lake, entries)
                async with contextlib.aclosing(
                    self._rechunk(plan, symbol, batches, chunk_rows)
                ) as blocks:
                    async for block in blocks:
                        found = True
                        yield build_frame(
                            _merge_blocks(plan, [block]), plan.output, exact=plan.exact
                        )
                if not found:
                    empty.append(symbol)
            await warn_other_case(raw, empty)

    async def _rechunk(
        self,
        plan: _Plan,
        symbol: str,
        batches: AsyncGenerator[list[DecodedColumn]],
        chunk_rows: int,
    ) -> AsyncGenerator[_Block]:
        """``batches`` (in output order) as blocks of ``chunk_rows`` rows, the last one fewer."""
        pending: list[list[DecodedColumn]] = []
        pending_rows = 0
        async with contextlib.aclosing(batches):
            async for batch in batches:
                if not len(batch[0]):
                    continue
                pending.append(batch)
                pending_rows += len(batch[0])
                while pending_rows >= chunk_rows:
                    block = _block_from_batches(plan, symbol, pending, check_order=False)
                    head, tail = _split_block(plan, block, chunk_rows)
                    yield head
                    pending = [[tail.columns[name] for name in plan.copy_columns]]
                    pending_rows = tail.nrows
        if pending_rows:
            yield _block_from_batches(plan, symbol, pending, check_order=False)

    async def _symbol_batches(
        self,
        raw: asyncpg.Connection,
        plan: _Plan,
        symbol: str,
        lake: Lake | None,
        entries: Sequence[LakeRangeEntry],
    ) -> AsyncGenerator[list[DecodedColumn]]:
        """One symbol's rows in output order, as batches: PostgreSQL streams the ranges not in
        the lake; each UTC day of a lake range is its files' rows merged with the rows
        PostgreSQL holds for that day (late rows), so memory holds at most a day of lake rows.
        """
        cursor = plan.start_us
        windows = lake_windows(entries, symbol, plan.start_us, plan.end_us) if lake else []
        for low, high, held in windows:
            if cursor < low:
                async with contextlib.aclosing(
                    self._stream_batches(raw, plan, symbol, cursor, low)
                ) as stream:
                    async for batch in stream:
                        yield batch
            assert lake is not None
            day = low
            while day < high:
                day_end = min(high, (day // US_PER_DAY + 1) * US_PER_DAY)
                refs = [
                    ref for e in held for ref in e.files_of(symbol, plan.exchange, day, day_end)
                ]
                stored = _block_from_batches(
                    plan,
                    symbol,
                    await self._copy_batches(raw, plan, _Part(symbol, day, day_end)),
                    check_order=True,
                )
                in_lake = await asyncio.to_thread(
                    _lake_block, lake, refs, plan, symbol, day, day_end
                )
                merged = _merged(plan, symbol, [stored, in_lake])
                yield [merged.columns[name] for name in plan.copy_columns]
                day = day_end
            cursor = high
        if cursor < plan.end_us:
            async with contextlib.aclosing(
                self._stream_batches(raw, plan, symbol, cursor, plan.end_us)
            ) as stream:
                async for batch in stream:
                    yield batch

    async def _stream_batches(
        self, raw: asyncpg.Connection, plan: _Plan, symbol: str, start_us: int, end_us: int
    ) -> AsyncGenerator[list[DecodedColumn]]:
        """The COPY of ``symbol`` in ``[start_us, end_us)``, ordered by (timestamp, id) by the
        server, as decoded batches; the COPY waits (TCP back-pressure) while one is held."""
        queue: asyncio.Queue[list[DecodedColumn] | None] = asyncio.Queue(maxsize=1)
        decoder = TextCopyDecoder(plan.kinds, exact=plan.exact, batch_bytes=self.batch_bytes)

        async def sink(chunk: bytes) -> None:
            for batch in decoder.feed(chunk):
                await queue.put(batch)  # waits while the consumer is behind

        async def produce() -> None:
            await raw.copy_from_query(
                plan.copy_sql(order_by_id=True, start_us=start_us, end_us=end_us), output=sink
            )
            for batch in decoder.finish():
                await queue.put(batch)
            await queue.put(None)

        await raw.fetchval(_BIND_SQL, *plan.bind_args(symbol))
        producer = asyncio.ensure_future(produce())
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    {getter, producer}, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                    producer.result()  # raises the COPY's error
                    continue
                batch = getter.result()
                if batch is None:
                    break
                yield batch
            await producer
        finally:
            if not producer.done():
                producer.cancel()
                with _suppress_cancel():
                    await producer

    async def latest(
        self,
        symbols: str | Iterable[str] | None = None,
        *,
        output: Output = "pandas",
        exact: bool = False,
    ) -> Frame:
        """The last quote (greatest timestamp, then id) of each symbol, ordered by symbol.

        Each symbol's last quote is one backward index probe (on a partitioned table, into the
        newest partition holding it: see ``read.probes``). ``symbols=None`` means every stored
        symbol: those ``orderbook_symbols`` lists (revision 0006; a symbol listed but no longer
        stored is left out), or on an older schema those a skip scan of
        ``idx_orderbook_symbol_timestamp`` finds (one index probe per distinct symbol, in each
        partition); never a table scan.
        """
        checked_output = _check_output(output)
        names = None if symbols is None else sorted(set(_symbol_list(symbols)))
        columns = ("id", *QUOTE_COLUMNS)
        async with read_snapshot(self.engine) as raw:
            layout = await prepare_probes(raw)
            if names is None:
                stored = [dict(r) for r in await latest_of_every_symbol(raw, layout)]
                by_symbol: dict[str, dict[str, Any] | None] = {str(r["symbol"]): r for r in stored}
                # Only symbols a dropped range ends after PostgreSQL's last quote need the lake.
                newest = await self._catalog.newest_by_symbol(raw)
                for name, end_us in newest.items():
                    row = by_symbol.get(name)
                    if row is None or end_us > int(row["timestamp"]):
                        by_symbol.setdefault(name, None)
                probes = [Probe(name) for name in sorted(by_symbol)]
                found = [by_symbol[p.symbol] for p in probes]
                asking = [
                    p.symbol
                    for p, f in zip(probes, found, strict=True)
                    if p.symbol in newest and (f is None or newest[p.symbol] > int(f["timestamp"]))
                ]
                if asking:
                    found = await self._across_tiers(raw, probes, found, None, asking)
            else:
                probes = [Probe(name) for name in names]
                stored_rows = await last_quotes(raw, layout, probes)
                found = [None if r is None else dict(r) for r in stored_rows]
                found = await self._across_tiers(raw, probes, found, None, names)
            picked = [row for row in found if row is not None]
            if names is not None:
                await warn_other_case(raw, set(names) - {row["symbol"] for row in picked})
        picked.sort(key=lambda r: str(r["symbol"]))
        data = _rows_to_columns(picked, columns, exact)
        return build_frame({c: data[c] for c in QUOTE_COLUMNS}, checked_output, exact=exact)

    async def _across_tiers(
        self,
        raw: asyncpg.Connection,
        probes: Sequence[Probe],
        found: list[dict[str, Any] | None],
        exchange: str | None,
        symbols: Sequence[str],
    ) -> list[dict[str, Any] | None]:
        """PostgreSQL's answers to ``probes`` (``found``), each replaced by the lake's last
        quote at or before the probe's time where that is later (``read.lake_probes``).

        Runs after the probes, in their snapshot, asking the catalog only for dropped ranges
        that end after the earliest answer and start at or before the latest time:
        usually none, one small query.
        """
        lower = (
            None if any(f is None for f in found) else min(int(f["timestamp"]) for f in found if f)
        )
        uppers = [p.upper_us for p in probes]
        upper = (
            None if any(u is None for u in uppers) else max(u for u in uppers if u is not None) + 1
        )
        entries = await self._catalog.dropped(raw, lower, upper, symbols)
        lake = self._lake_for(entries)
        if lake is None:
            return found
        probing = LakeProbes(lake, entries, exchange)
        asked = [
            i
            for i, (p, f) in enumerate(zip(probes, found, strict=True))
            if probing.needed(p.symbol, p.upper_us, f)
        ]
        if not asked:
            return found

        def ask() -> list[dict[str, Any] | None]:
            out = list(found)
            for i in asked:
                out[i] = probing.last(probes[i].symbol, probes[i].upper_us, found[i])
            return out

        return await asyncio.to_thread(ask)

    async def asof(
        self,
        symbol: str,
        times: Iterable[TimeLike] | TimeLike,
        *,
        exchange: str | None = None,
        output: Output = "pandas",
        exact: bool = False,
    ) -> Frame:
        """For each of ``times``, the quote in force then: the last one at or before it.

        One row per given time, in the given order, with a ``time`` column first; rows with no
        earlier quote hold NaN/NaT. This is ``pandas.merge_asof(times, quotes,
        direction="backward")``. Few times: one backward index probe each, in the database.
        Many times (``asof_range_min_times`` or more) over a range holding not many more quotes
        than times: one range read from the quote in force at the earliest time to the latest
        time, matched on the client with a binary search; never the whole table.
        """
        checked_symbol = _check_symbol(symbol)
        checked_output = _check_output(output)
        checked_exchange = _check_exchange(exchange)
        stamps = [to_epoch_us(t, "times") for t in _time_list(times)]
        if len(stamps) >= self.asof_range_min_times:
            ranged = await self._asof_by_range(
                checked_symbol, stamps, checked_exchange, checked_output, exact
            )
            if ranged is not None:
                return build_frame(ranged, checked_output, exact=exact)
        columns = ("time", *QUOTE_COLUMNS)
        rows: list[Mapping[str, object]] = []
        if stamps:
            async with read_snapshot(self.engine) as raw:
                layout = await prepare_probes(raw)
                probes = [Probe(checked_symbol, stamp) for stamp in stamps]
                stored = await last_quotes(raw, layout, probes, exchange=checked_exchange)
                found = await self._across_tiers(
                    raw,
                    probes,
                    [None if r is None else dict(r) for r in stored],
                    checked_exchange,
                    [checked_symbol],
                )
                if all(row is None for row in found):
                    await warn_other_case(raw, [checked_symbol])
            rows = [
                {"time": stamp, **{c: None if row is None else row[c] for c in QUOTE_COLUMNS}}
                for stamp, row in zip(stamps, found, strict=True)
            ]
        data = _rows_to_columns(rows, columns, exact)
        if "time" in data and not rows:
            data["time"] = np.zeros(0, dtype=np.int64)
        return build_frame(data, checked_output, exact=exact)

    async def _asof_by_range(
        self,
        symbol: str,
        stamps: list[int],
        exchange: str | None,
        output: Output,
        exact: bool,
    ) -> dict[str, DecodedColumn] | None:
        """As-of by one bounded range read, or None when that range holds too many rows."""
        earliest, latest = min(stamps), max(stamps)
        async with read_snapshot(self.engine) as raw:
            layout = await prepare_probes(raw)
            probe = Probe(symbol, earliest)
            [stored] = await last_quotes(raw, layout, [probe], exchange=exchange)
            [in_force] = await self._across_tiers(
                raw, [probe], [None if stored is None else dict(stored)], exchange, [symbol]
            )
            start = earliest if in_force is None else int(in_force["timestamp"])
            explained = await raw.fetchval(_ESTIMATE_SQL, symbol, start, latest + 1, exchange)
            in_lake = await self._catalog.dropped(raw, start, latest + 1, [symbol])
        if isinstance(explained, str | bytes):
            explained = json.loads(explained)
        estimate = int(explained[0]["Plan"]["Plan Rows"])
        estimate += sum(entry.rows_of_one_symbol(start, latest + 1) for entry in in_lake)
        if estimate > self.asof_range_rows_per_time * len(stamps):
            return None
        plan = plan_quotes(symbol, start, latest + 1, exchange=exchange, output=output, exact=exact)
        columns = await self._read_columns(plan)
        wanted = np.array(stamps, dtype=np.int64)
        stored = columns["timestamp"]
        assert isinstance(stored, np.ndarray)
        # Rows come ordered by (timestamp, id): the last one at or before each time wins.
        index = np.searchsorted(stored, wanted, side="right") - 1
        missing = index < 0
        index[missing] = 0
        out: dict[str, DecodedColumn] = {"time": wanted}
        for name, column in columns.items():
            out[name] = _take_or_missing(column, index, missing, name)
        return out

    async def resample(
        self,
        symbol: str,
        start: TimeLike,
        end: TimeLike,
        freq: str | dt.timedelta | int = "1min",
        *,
        exchange: str | None = None,
        output: Output = "pandas",
    ) -> Frame:
        """Per time bucket of width ``freq``: OHLC of the mid price, last bid and ask, mean
        spread and quote count, computed in PostgreSQL.

        ``freq`` is a fixed width as pandas spells it (``"100ms"``, ``"5s"``, ``"1min"``,
        ``"1h"``, ``"1D"``, ``"us"``, ``"1h30min"``), a timedelta or int µs; pandas' calendar
        frequencies (``"M"``, ``"ME"``, ``"Y"``, ``"Q"``, ``"W"``) have no fixed width and
        raise ``InvalidArgument``. Buckets are aligned to the Unix epoch (for widths that
        divide a day, the same as pandas' default) and labelled by their start. Buckets
        without quotes are absent, not NaN rows. Columns: bucket, open, high, low, close,
        last_bid, last_ask, mean_spread, quotes. Values are the exact decimal results rounded
        once to float64.
        """
        checked_symbol = _check_symbol(symbol)
        checked_output = _check_output(output)
        checked_exchange = _check_exchange(exchange)
        width = parse_freq_us(freq)
        start_us = to_epoch_us(start, "start")
        end_us = to_epoch_us(end, "end")
        if start_us >= end_us:
            raise InvalidArgument(f"start={start!r} must be before end={end!r}")
        args = (checked_symbol, start_us, end_us, width, checked_exchange)
        async with read_snapshot(self.engine) as raw:
            entries = await self._catalog.dropped(raw, start_us, end_us, [checked_symbol])
            lake = self._lake_for(entries)
            if lake is None:
                rows = await raw.fetch(RESAMPLE_SQL, *args)
            else:
                in_lake = asyncio.ensure_future(
                    asyncio.to_thread(
                        lake_partials,
                        lake,
                        entries,
                        checked_symbol,
                        checked_exchange,
                        start_us,
                        end_us,
                        width,
                    )
                )
                try:
                    stored = stored_partials(await raw.fetch(PARTIALS_SQL, *args))
                    buckets = merge_partials(stored, await in_lake)
                except BaseException:
                    if not in_lake.done():
                        _detach(in_lake)
                    raise
                rows = await finish(raw, buckets) if buckets else []
            if not rows:
                await warn_other_case(raw, [checked_symbol])
        data = _rows_to_columns([dict(r) for r in rows], RESAMPLE_COLUMNS, False)
        for name in RESAMPLE_COLUMNS[1:-1]:
            if len(data[name]) == 0:
                data[name] = np.zeros(0, dtype=np.float64)
        return build_frame(data, checked_output, exact=False)


def _time_list(times: object) -> list[object]:
    """``times`` as a list: one time (or a value that is not a time, which ``to_epoch_us``
    then names) becomes a list of one."""
    if isinstance(times, str | bytes | dt.date | np.datetime64) or not isinstance(times, Iterable):
        return [times]
    return list(times)


def _empty_symbols(parts: list[_Part], results: list[list[list[DecodedColumn]]]) -> set[str]:
    """The symbols of a range read that no part found a row for."""
    found = {
        part.symbol
        for part, batches in zip(parts, results, strict=True)
        if any(len(batch[0]) for batch in batches)
    }
    return {part.symbol for part in parts} - found


class _suppress_cancel:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return exc_type is asyncio.CancelledError or isinstance(exc, Exception)


_DETACHED: set[asyncio.Future[Any]] = set()


def _detach(task: asyncio.Future[Any]) -> None:
    """Let ``task`` finish on its own: keep it referenced, and its outcome retrieved."""
    _DETACHED.add(task)

    def done(finished: asyncio.Future[Any]) -> None:
        _DETACHED.discard(finished)
        if not finished.cancelled():
            finished.exception()

    task.add_done_callback(done)


async def _export_snapshot(raw: asyncpg.Connection) -> str | None:
    """This transaction's snapshot id for a second connection, or None on a standby (which
    cannot export one): the read then stays on one connection.

    No savepoint around it: PostgreSQL refuses to export from a subtransaction.
    """
    snapshot = await raw.fetchval(
        "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_export_snapshot() END"
    )
    return None if snapshot is None else str(snapshot)


def _lake_blocks(lake: Lake, entries: Sequence[LakeRangeEntry], plan: _Plan) -> dict[str, _Block]:
    """Each symbol's rows of ``plan`` that are in the lake (symbols with none left out)."""
    out: dict[str, _Block] = {}
    for symbol in plan.symbols:
        refs = [
            ref
            for entry in entries
            for ref in entry.files_of(symbol, plan.exchange, plan.start_us, plan.end_us)
        ]
        if refs:
            block = _lake_block(lake, refs, plan, symbol, plan.start_us, plan.end_us)
            if block.nrows:
                out[symbol] = block
    return out


def _lake_block(
    lake: Lake, refs: Sequence[LakeFileRef], plan: _Plan, symbol: str, start_us: int, end_us: int
) -> _Block:
    """The rows of ``refs`` in ``[start_us, end_us)`` as a block of ``plan``'s columns."""
    table = read_lake_rows(lake, refs, plan.copy_columns, start_us, end_us)
    return _Block(symbol, table.num_rows, decode_table(table, plan.copy_columns, plan.exact))


def _merged(plan: _Plan, symbol: str, blocks: Sequence[_Block]) -> _Block:
    """One symbol's blocks from both tiers as one block in (timestamp, id) order."""
    blocks = [b for b in blocks if b.nrows] or list(blocks[:1])
    if len(blocks) == 1:
        return blocks[0]
    kinds = dict(zip(plan.copy_columns, plan.kinds, strict=True))
    columns = {
        name: _concat([b.columns[name] for b in blocks], kinds[name], plan.exact)
        for name in plan.copy_columns
    }
    stamps, ids = columns["timestamp"], columns["id"]
    assert isinstance(stamps, np.ndarray) and isinstance(ids, np.ndarray)
    order = sort_order(stamps, ids)
    if order is not None:
        columns = {name: _first_seen(_take(column, order)) for name, column in columns.items()}
    return _Block(symbol, len(stamps), columns)


def _first_seen(column: DecodedColumn) -> DecodedColumn:
    """A text column's categories renumbered in order of first appearance, as decoding
    PostgreSQL's rows numbers them (so merged tiers give the same categoricals)."""
    if not isinstance(column, TextColumn) or not len(column.codes):
        return column
    present, first = np.unique(column.codes[column.codes >= 0], return_index=True)
    seen = present[np.argsort(first)]
    remap = np.full(len(column.categories) + 1, -1, dtype=np.int32)
    remap[seen] = np.arange(len(seen), dtype=np.int32)
    return TextColumn(remap[column.codes], tuple(column.categories[i] for i in seen))


def _with_lake_blocks(
    plan: _Plan, blocks: list[_Block], lake_blocks: Mapping[str, _Block]
) -> list[_Block]:
    """PostgreSQL's blocks (in symbol order) with each symbol's lake rows merged in."""
    out: list[_Block] = []
    for symbol in plan.symbols:
        own = [b for b in blocks if b.symbol == symbol]
        if symbol in lake_blocks:
            out.append(_merged(plan, symbol, [*own, lake_blocks[symbol]]))
        else:
            out.extend(own)
    return out
