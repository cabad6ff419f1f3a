"""``verify``: does the database hold exactly the rows a file holds?

Per file, the rows it would import (after the same validation; rejected lines are reported,
not expected) are grouped by exchange and symbol, and each group is compared with the
database's rows of that exchange and symbol between the group's first and last ``timestamp``:
row count, first and last timestamp, and a checksum of the values. The checksum is the sum of
the first 64 bits (signed) of the MD5 of each row's text
``exchange|symbol|timestamp|local_timestamp|ask_amount|ask_price|bid_price|bid_amount``,
decimals written with 8 decimals (as PostgreSQL prints DECIMAL(20,8)) and NULL as nothing:
order-independent, computed by the server with ``md5()`` and here with ``hashlib``, so a
missing, extra or altered row changes it.

When a group differs, the file's rows are sent to a temporary table and compared with the
database's row by row, as multisets (a quote the file holds ``n`` times and the database ``m``
times matches ``min(n, m)`` times; values compared as stored, NULL equal to NULL), which tells:

* ``overlap``: every row of the file is in the database, which holds more in the same range:
  rows of another source (the collector, an overlapping file), or further copies of the
  file's own quotes (``extra_copies``: what importing with ``allow_duplicates`` leaves);
* ``mismatch``: rows of the file are missing (a changed value is one missing and one extra).

``exit_code``: 0 when every file matches, 3 when none is missing a row but some overlap, 1
when a row is missing or a file could not be read.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.files.importers.base import ImportOptions, Reader, RefusedFile
from orderbook_store.files.importers.dedupe import pending_table_sql, planned_for_bulk, same_quote
from orderbook_store.files.importers.detect import detect, expand
from orderbook_store.files.importers.rows import Checked, copy_csv
from orderbook_store.models import DECIMAL_COLUMNS, QUOTE_COLUMNS, OrderbookData
from orderbook_store.pg.connection import raw_connection


@dataclass
class Stats:
    """What is compared: count, first and last timestamp, value checksum."""

    rows: int = 0
    first: int | None = None
    last: int | None = None
    checksum: int = 0

    def add(self, other: Stats) -> None:
        self.rows += other.rows
        self.checksum += other.checksum
        if other.first is not None:
            self.first = other.first if self.first is None else min(self.first, other.first)
        if other.last is not None:
            self.last = other.last if self.last is None else max(self.last, other.last)


@dataclass
class GroupCheck:
    """One exchange/symbol of a file against the database.

    ``matched`` (rows of the file found in the database) and ``extra_copies`` (the database's
    copies of the file's quotes beyond the file's count) are counted only when the statistics
    differ; ``None`` when they agree.
    """

    exchange: str
    symbol: str
    file: Stats
    database: Stats
    matched: int | None = None
    extra_copies: int = 0

    @property
    def ok(self) -> bool:
        return self.file == self.database

    @property
    def status(self) -> str:
        """``ok``, ``overlap`` (every row of the file stored, and more) or ``mismatch``."""
        if self.ok:
            return "ok"
        return "overlap" if self.missing == 0 else "mismatch"

    @property
    def missing(self) -> int:
        """Rows of the file the database lacks."""
        return self.file.rows - (self.file.rows if self.ok else (self.matched or 0))

    @property
    def extra(self) -> int:
        """Rows of the database in the group's range that are not the file's."""
        return self.database.rows - (self.file.rows if self.ok else (self.matched or 0))


@dataclass
class FileCheck:
    """One file's verdict: ``ok``, ``overlap``, ``mismatch`` or ``refused``."""

    file: str
    format: str = ""
    status: str = "ok"
    groups: list[GroupCheck] = field(default_factory=list)
    rejected: int = 0
    message: str = ""


@dataclass
class VerifySummary:
    """All files' verdicts; ``exit_code`` is 0 only when every file matched."""

    files: list[FileCheck] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        statuses = {check.status for check in self.files}
        if statuses <= {"ok"}:
            return 0
        return 3 if statuses <= {"ok", "overlap"} else 1


def row_texts(rows: pa.Table) -> pa.Array:
    """Each row's canonical text (see the module docstring), vectorized."""
    parts = [
        rows.column("exchange"),
        rows.column("symbol"),
        rows.column("timestamp").cast(pa.string()),
        rows.column("local_timestamp").cast(pa.string()),
    ]
    for name in DECIMAL_COLUMNS:
        parts.append(fixed_scale(rows.column(name)))
    return pc.binary_join_element_wise(*parts, "|", null_handling="replace", null_replacement="")


def fixed_scale(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Plain decimal strings (as validated rows hold them) with exactly 8 decimals.

    Done on the text, not through Arrow's decimal cast, which prints small values in
    scientific notation (``0E-8``) where PostgreSQL prints ``0.00000000``.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dotted = pc.if_else(
        pc.match_substring(column, "."),
        column,
        pc.binary_join_element_wise(column, pa.scalar(""), "."),
    )
    parts = pc.split_pattern(dotted, ".", max_splits=1)
    integer = pc.replace_substring_regex(pc.list_element(parts, 0), "^0+([0-9])", r"\1")
    fraction = pc.utf8_rpad(pc.utf8_slice_codeunits(pc.list_element(parts, 1), 0, 8), 8, "0")
    return pc.binary_join_element_wise(integer, fraction, ".")


def checksum_of(texts: Sequence[str]) -> int:
    """Sum of the signed first 64 bits of each text's MD5 (``md5`` here is not for security)."""
    total = 0
    for value in texts:
        digest = hashlib.md5(value.encode(), usedforsecurity=False).digest()
        total += int.from_bytes(digest[:8], "big", signed=True)
    return total


def block_stats(checked: Checked) -> dict[tuple[str, str], Stats]:
    """Per exchange/symbol statistics of one validated block."""
    rows = checked.rows
    found: dict[tuple[str, str], Stats] = {}
    if rows.num_rows == 0:
        return found
    keys = rows.select(["exchange", "symbol"]).group_by(["exchange", "symbol"]).aggregate([])
    for key in keys.to_pylist():
        mask = pc.and_(
            pc.equal(rows.column("exchange"), key["exchange"]),
            pc.equal(rows.column("symbol"), key["symbol"]),
        )
        part = rows.filter(mask)
        bounds = pc.min_max(part.column("timestamp")).as_py()
        found[(key["exchange"], key["symbol"])] = Stats(
            rows=part.num_rows,
            first=bounds["min"],
            last=bounds["max"],
            checksum=checksum_of(row_texts(part).to_pylist()),
        )
    return found


def file_stats(reader: Reader) -> tuple[dict[tuple[str, str], Stats], int]:
    """Statistics of every exchange/symbol in a file, and how many lines it rejects."""
    totals: dict[tuple[str, str], Stats] = {}
    rejected = 0
    for checked in reader.blocks():
        rejected += len(checked.rejected)
        for key, stats in block_stats(checked).items():
            totals.setdefault(key, Stats()).add(stats)
    return totals, rejected


_TABLE = OrderbookData.__tablename__
_ROW_TEXT = (
    "concat_ws('|', exchange, symbol, timestamp::text, local_timestamp::text, "
    + ", ".join(f"coalesce({name}::text, '')" for name in DECIMAL_COLUMNS)
    + ")"
)
_DATABASE_STATS = text(
    f"SELECT count(*), min(timestamp), max(timestamp), "
    f"coalesce(sum(('x' || left(md5({_ROW_TEXT}), 16))::bit(64)::bigint), 0) "
    f"FROM {_TABLE} WHERE exchange = :exchange AND symbol = :symbol "
    "AND timestamp BETWEEN :first AND :last"
)


async def database_stats(
    engine: AsyncEngine, exchange: str, symbol: str, first: int, last: int
) -> Stats:
    """The database's statistics for one exchange/symbol and timestamp range (inclusive)."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                _DATABASE_STATS,
                {"exchange": exchange, "symbol": symbol, "first": first, "last": last},
            )
        ).one()
    return Stats(rows=int(row[0]), first=row[1], last=row[2], checksum=int(row[3]))


async def verify_paths(
    engine: AsyncEngine, paths: Sequence[Path], *, options: ImportOptions | None = None
) -> VerifySummary:
    """Compare every file (directories walked) with the database; see the module docstring."""
    options = options or ImportOptions()
    summary = VerifySummary()
    for unit in expand(list(paths)):
        check = FileCheck(unit.display)
        summary.files.append(check)
        try:
            reader = detect(unit, options)
        except RefusedFile as exc:
            check.status, check.message = "refused", str(exc)
            continue
        check.format = reader.format
        totals, check.rejected = await asyncio.to_thread(file_stats, reader)
        for (exchange, symbol), stats in sorted(totals.items()):
            assert stats.first is not None and stats.last is not None
            found = await database_stats(engine, exchange, symbol, stats.first, stats.last)
            check.groups.append(GroupCheck(exchange, symbol, stats, found))
        differing = [group for group in check.groups if not group.ok]
        if differing:
            await compare_rows(engine, reader, differing)
            statuses = {group.status for group in differing}
            check.status = "mismatch" if "mismatch" in statuses else "overlap"
    return summary


_ROWS = "orderbook_verify_rows"
_KEY = ", ".join(f'"{name}"' for name in QUOTE_COLUMNS)


def _overlap_sql(first: int, last: int) -> str:
    """Rows matched (multiset intersection) and extra copies of the file's quotes, one group.

    Times are literals so the planner reads only the partitions of the range.
    """
    return f"""
        WITH f AS (
            SELECT {_KEY}, count(*) AS copies FROM {_ROWS}
            WHERE exchange = $1 AND symbol = $2 GROUP BY {_KEY}
        ), d AS (
            SELECT {_KEY}, count(*) AS copies FROM {_TABLE}
            WHERE exchange = $1 AND symbol = $2 AND "timestamp" BETWEEN {int(first)} AND {int(last)}
            GROUP BY {_KEY}
        )
        SELECT coalesce(sum(least(f.copies, d.copies)), 0)::bigint,
               coalesce(sum(greatest(d.copies - f.copies, 0)), 0)::bigint
        FROM f JOIN d ON {same_quote("f", "d")}
    """


async def compare_rows(engine: AsyncEngine, reader: Reader, groups: Sequence[GroupCheck]) -> None:
    """Fill ``matched`` and ``extra_copies`` of ``groups``: the file's rows, sent to a temporary
    table, against the database's (see the module docstring). Reads the file once more."""
    async with engine.begin() as conn:
        await conn.execute(text("SELECT 1"))  # begins the transaction (the dialect is lazy)
        raw = await raw_connection(conn)
        await raw.execute(pending_table_sql(_ROWS))
        blocks = reader.blocks()
        try:
            while (data := await asyncio.to_thread(_next_block, blocks)) is not None:
                if data:
                    # A memoryview, because asyncpg would take plain bytes for a file *path*.
                    await raw.copy_to_table(
                        _ROWS, source=memoryview(data), columns=list(QUOTE_COLUMNS), format="csv"
                    )
        finally:
            close = getattr(blocks, "close", None)
            if close is not None:
                await asyncio.to_thread(close)
        await raw.execute(f"ANALYZE {_ROWS}")
        async with planned_for_bulk(raw):
            for group in groups:
                assert group.file.first is not None and group.file.last is not None
                row = await raw.fetchrow(
                    _overlap_sql(group.file.first, group.file.last), group.exchange, group.symbol
                )
                assert row is not None
                group.matched, group.extra_copies = int(row[0]), int(row[1])


def _next_block(blocks: Iterator[Checked]) -> bytes | None:
    for checked in blocks:
        return copy_csv(checked.rows)
    return None
