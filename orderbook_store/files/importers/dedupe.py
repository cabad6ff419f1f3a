"""Never twice: a file adds only the quotes ``orderbook_data`` does not hold already.

**Same quote**: equal exchange, symbol, timestamp, local_timestamp and four values, the values
compared as the table stores them (DECIMAL(20,8), so ``1.0`` equals ``1.00``; NULL equals NULL).

**Multisets**: a quote a file holds ``n`` times, of which the table already holds ``m`` copies
(stored by anything but this file's own transaction: the writer, an earlier file, an earlier
run), is stored ``max(0, n - m)`` more times, so the table then holds it ``max(n, m)`` times.
So identical lines within one new file are kept as they are (a feed does repeat a quote: two
updates with equal values in one millisecond, in a millisecond format), only what is already
stored is skipped; a file imported again under another name, or an export of the table
imported back, adds nothing; and two overlapping sources store each quote once, or as many
times as the source with more copies holds it.

**How**, inside the file's transaction, for each block of a few MB:

1. the partitions the block's time range falls in are locked in ``SHARE ROW EXCLUSIVE`` mode
   (once each), so nothing else can insert into them until the file commits (below);
2. one index range probe (``idx_orderbook_symbol_timestamp``, at most :data:`PROBE_ROWS` rows
   read) asks whether the table holds a row of the block's symbols in its range that this
   transaction did not write. When it does not (new data: the common case), the block is
   copied straight into the table, as without deduplication, at the same speed;
3. otherwise the block goes to a temporary table, and at the end of the file one ``INSERT ...
   SELECT`` stores what the rule lets through: the pending rows and the stored rows of the
   pending ranges are counted per quote (hash aggregates), matched (a hash join on NULL-safe
   keys), and each quote is inserted ``n - m`` more times where that is positive.

Why this is exact: copies of one quote may lie in different blocks, so they are counted over
all pending rows of the file, not per block; and no copy of a quote that is stored
(``m > 0``) can be in a block copied straight in, since that block's range held no row of
anyone else's. This transaction's own rows are told apart by ``xmin`` (its transaction id)
*and* ``created_at`` (its start, the column's default): an old frozen row whose transaction id
equals this one's after a wraparound still differs in ``created_at``.

**Concurrency**: the lock makes another session's rows for the same partitions either
committed before the block is looked at (and so skipped) or written after this file commits
(that writer then adds its copies itself, as it always would). The writer, inserting today's
quotes into today's partition, waits only while a file of today is being imported; two
imports into the same partitions take turns (the default partition, where rows of days
without a partition land, is one of them: ``orderbook-store partitions ensure --since DATE``
before importing old data avoids that). Partitions are locked in the order blocks reach them,
so two imports can deadlock; the server then aborts one, whose file the pipeline imports again.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import asyncpg
from sqlalchemy.dialects import postgresql

from orderbook_store.models import QUOTE_COLUMNS, OrderbookData
from orderbook_store.pg.connection import copy_quotes_in

#: Rows the probe reads at most; past it, a range full of this file's own rows counts as
#: overlapping (the block goes the exact, slower way), so no probe scans a large range.
PROBE_ROWS: Final = 1024

#: More merged ranges than this per symbol are replaced by their hull in the final statement.
MAX_RANGES_PER_SYMBOL: Final = 64

PENDING: Final = "orderbook_import_pending"

_TABLE: Final = OrderbookData.__tablename__
_COLUMNS: Final = ", ".join(f'"{name}"' for name in QUOTE_COLUMNS)
_NULLABLE: Final = tuple(c.name for c in OrderbookData.__table__.columns if c.nullable)
_BOUND: Final = re.compile(r"^FOR VALUES FROM \('(-?\d+)'\) TO \('(-?\d+)'\)$")

#: Rows this transaction did not write (see the module docstring for why both conditions);
#: ``IS NOT TRUE`` keeps rows whose ``created_at`` is NULL, which are someone else's.
NOT_OURS: Final = "(xmin = pg_current_xact_id()::xid AND created_at = LOCALTIMESTAMP) IS NOT TRUE"


def same_quote(left: str, right: str) -> str:
    """SQL: the rows aliased ``left`` and ``right`` are the same quote.

    NULL-safe yet hashable (``IS NOT DISTINCT FROM`` is neither hash- nor merge-joinable, so
    it would force a nested loop): nullable columns compare their NULL-ness and their value
    with NULL read as 0.
    """
    terms = []
    for name in QUOTE_COLUMNS:
        a, b = f'{left}."{name}"', f'{right}."{name}"'
        if name in _NULLABLE:
            terms.append(f"({a} IS NULL) = ({b} IS NULL)")
            terms.append(f"coalesce({a}, 0) = coalesce({b}, 0)")
        else:
            terms.append(f"{a} = {b}")
    return " AND ".join(terms)


def pending_table_sql(name: str = PENDING) -> str:
    """``CREATE TEMP TABLE`` for rows held back: the quote columns with the table's own types
    (so values are coerced exactly as the table would), plus their order of arrival."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    columns = ", ".join(
        f'"{c.name}" {c.type.compile(dialect=dialect)}'
        for c in OrderbookData.__table__.columns
        if c.name in QUOTE_COLUMNS
    )
    return (
        f"CREATE TEMP TABLE {name} ({columns}, "
        "ordinal bigint GENERATED ALWAYS AS IDENTITY) ON COMMIT DROP"
    )


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive ranges merged where they overlap or touch; their hull when too many remain."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    if len(merged) > MAX_RANGES_PER_SYMBOL:
        merged = [(merged[0][0], max(hi for _, hi in merged))]
    return merged


def ranges_sql(ranges: dict[str, list[tuple[int, int]]]) -> tuple[str, list[str]]:
    """A WHERE clause over ``symbol``/``timestamp`` for these ranges, and its parameters.

    Timestamps are written as literals (they are integers) so the planner prunes partitions
    while planning, and locks only the partitions it reads.
    """
    clauses, symbols = [], []
    for symbol, spans in sorted(ranges.items()):
        symbols.append(symbol)
        times = " OR ".join(
            f'"timestamp" BETWEEN {int(lo)} AND {int(hi)}' for lo, hi in merge_ranges(spans)
        )
        clauses.append(f"(symbol = ${len(symbols)} AND ({times}))")
    return " OR ".join(clauses) or "false", symbols


def final_insert_sql(where: str) -> str:
    """``INSERT ... SELECT`` of the pending rows not already stored (see the module docstring).

    Both sides are counted per quote with hash aggregates and matched with a hash join: no
    sort of the wide key, no per-row probe. The rows stored keep the order in which each
    quote first arrived (copies of one quote go in together).
    """
    key = ", ".join(f'i."{name}"' for name in QUOTE_COLUMNS)
    return f"""
        WITH stored AS (
            SELECT {_COLUMNS}, count(*) AS copies
            FROM {_TABLE}
            WHERE ({where}) AND {NOT_OURS}
            GROUP BY {_COLUMNS}
        ), incoming AS (
            SELECT {_COLUMNS}, count(*) AS copies, min(ordinal) AS first
            FROM {PENDING}
            GROUP BY {_COLUMNS}
        )
        INSERT INTO {_TABLE} ({_COLUMNS})
        SELECT {key}
        FROM incoming i LEFT JOIN stored s ON {same_quote("i", "s")}
        CROSS JOIN LATERAL generate_series(1, i.copies - coalesce(s.copies, 0)) AS more
        ORDER BY i.first
    """


@contextlib.asynccontextmanager
async def planned_for_bulk(raw: asyncpg.Connection) -> AsyncIterator[None]:
    """Hash joins and no JIT for the statements inside (this transaction's settings restored).

    The joins here match every row of one side; with statistics that lag behind a bulk load
    (a partition filled moments ago reads as empty) the planner would pick a nested loop, or
    a merge join on one key column with the rest as a filter, and compare nearly every pair,
    whereas a hash join on every key column costs the same whatever the estimates. The
    estimates that disabling the others inflates would also start JIT compilation, which
    costs more than it saves here.
    """
    settings = ("enable_nestloop", "enable_mergejoin", "jit")
    before = [await raw.fetchval("SELECT current_setting($1)", name) for name in settings]
    for name in settings:
        await raw.execute("SELECT set_config($1, 'off', true)", name)
    yield
    # Not on an error: the transaction is aborted then, and its settings go with it.
    for name, value in zip(settings, before, strict=True):
        await raw.execute("SELECT set_config($1, $2, true)", name, value)


@dataclass(frozen=True)
class LeafPartition:
    """A table rows are stored in: a partition of ``orderbook_data`` (or the table itself)."""

    name: str
    start_us: int | None  # None: the default partition, or a bound this module cannot read
    end_us: int | None
    default: bool = False


async def _partitions(raw: asyncpg.Connection) -> list[LeafPartition]:
    """The leaves under ``orderbook_data`` (itself, when it is not partitioned)."""
    rows = await raw.fetch(
        """
        SELECT t.relid::regclass::text AS name, t.level,
               pg_get_expr(c.relpartbound, c.oid) AS bound
        FROM pg_partition_tree($1::regclass) t JOIN pg_class c ON c.oid = t.relid
        WHERE t.isleaf
        """,
        _TABLE,
    )
    found = []
    for row in rows:
        bound = row["bound"] or ""
        match = _BOUND.match(bound) if row["level"] == 1 else None
        if match:
            found.append(LeafPartition(row["name"], int(match[1]), int(match[2])))
        else:
            found.append(LeafPartition(row["name"], None, None, default=bound == "DEFAULT"))
    return found


def partitions_for(partitions: Sequence[LeafPartition], lo: int, hi: int) -> list[str]:
    """Names of the partitions rows with ``lo <= timestamp <= hi`` can be in.

    Ranged partitions that meet the range; the default partition when part of the range is
    in none of them; any partition whose bound was not understood, to be safe.
    """
    names: list[str] = []
    covered: list[tuple[int, int]] = []
    for part in partitions:
        if part.start_us is None or part.end_us is None:
            if not part.default:
                names.append(part.name)
            continue
        if part.start_us <= hi and lo < part.end_us:
            names.append(part.name)
            covered.append((max(part.start_us, lo), min(part.end_us - 1, hi)))
    if merge_ranges(covered) != [(lo, hi)]:
        names.extend(part.name for part in partitions if part.default)
    return names


@dataclass
class SkipStored:
    """One file's writes with deduplication, on the raw connection of its open transaction.

    ``add`` each block as COPY CSV with its symbols and time range; ``finish`` once, before
    the file's commit, returns ``(stored, skipped)`` row counts.
    """

    raw: asyncpg.Connection
    stored: int = 0
    skipped: int = 0
    _partitions: list[LeafPartition] | None = None
    _locked: set[str] = field(default_factory=set)
    _pending_rows: int = 0
    _pending_ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    async def add(self, data: bytes, rows: int, symbols: Sequence[str], lo: int, hi: int) -> None:
        """Store a block now if it is new, else hold it back for :meth:`finish`."""
        if not rows:
            return
        await self._lock(lo, hi)
        if await self._is_new(symbols, lo, hi):
            await self._copy(_TABLE, data)
            self.stored += rows
            return
        if not self._pending_rows:
            await self.raw.execute(pending_table_sql())
        await self._copy(PENDING, data)
        self._pending_rows += rows
        for symbol in symbols:
            self._pending_ranges.setdefault(symbol, []).append((lo, hi))

    async def finish(self) -> tuple[int, int]:
        """Store the held-back rows the multiset rule lets through; ``(stored, skipped)``."""
        if self._pending_rows:
            await self.raw.execute(f"ANALYZE {PENDING}")
            where, symbols = ranges_sql(self._pending_ranges)
            async with planned_for_bulk(self.raw):
                status = await self.raw.execute(final_insert_sql(where), *symbols)
            inserted = int(status.rsplit(" ", 1)[-1])
            self.stored += inserted
            self.skipped += self._pending_rows - inserted
            self._pending_rows = 0
            self._pending_ranges.clear()
        return self.stored, self.skipped

    async def _lock(self, lo: int, hi: int) -> None:
        if self._partitions is None:
            # Held anyway once rows go in; taken first so the partition list read next stays
            # true for the ranges locked below: creating, attaching or detaching a partition
            # needs a lock that conflicts with this one or with those.
            await self.raw.execute(f"LOCK TABLE ONLY {_TABLE} IN ROW EXCLUSIVE MODE")
            self._partitions = await _partitions(self.raw)
        for name in partitions_for(self._partitions, lo, hi):
            if name not in self._locked:
                await self.raw.execute(f"LOCK TABLE {name} IN SHARE ROW EXCLUSIVE MODE")
                self._locked.add(name)

    async def _is_new(self, symbols: Sequence[str], lo: int, hi: int) -> bool:
        near, others = await self.raw.fetchrow(
            f"SELECT count(*), count(*) FILTER (WHERE {NOT_OURS}) FROM ("
            f"SELECT xmin, created_at FROM {_TABLE} WHERE symbol = ANY($1::text[]) "
            f'AND "timestamp" BETWEEN {int(lo)} AND {int(hi)} LIMIT {PROBE_ROWS}) AS near',
            list(symbols),
        )
        return bool(others == 0 and near < PROBE_ROWS)

    async def _copy(self, table: str, data: bytes) -> None:
        if table == _TABLE:
            await copy_quotes_in(self.raw, data, format="csv")
            return
        # A memoryview, because asyncpg would take plain bytes for a file *path*.
        await self.raw.copy_to_table(
            table, source=memoryview(data), columns=list(QUOTE_COLUMNS), format="csv"
        )
