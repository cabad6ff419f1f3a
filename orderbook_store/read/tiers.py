"""Which parts of a read are in the lake: the catalog's dropped ranges, and their files.

``prune`` drops a partition only once ``archive`` copied it to the lake and recorded the range
in ``orderbook_lake_ranges``; it then stamps ``dropped_at``. A read asks that catalog, in its
own snapshot, for the dropped ranges overlapping it (one small query; on a database below
revision 0007, which has no catalog, one ``to_regclass`` instead) and takes those ranges from
the lake's files, PostgreSQL for everything else. Rows written later for a dropped range land
in the default partition, so a lake range can hold rows in both tiers: readers merge them.

The catalog names every file of a range (paths relative to the lake's root, in the lake
format's layout), so a read opens exactly the files of its symbols and dates: the bucket is
never listed.

Every read's transaction locks the parent table ``ACCESS SHARE`` *before* its snapshot is
taken (``read.snapshot``; ``LOCK`` takes none): a ``prune`` that detaches and drops a partition
either committed before the read's snapshot (the catalog then says so) or waits for the read
to end. Without the lock, a prune committing between the catalog query and the read's COPY
would drop rows from the answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from orderbook_store.errors import ConfigError
from orderbook_store.files.lake_format import LakeFileRef
from orderbook_store.models import LakeRange
from orderbook_store.times import from_us

if TYPE_CHECKING:
    import asyncpg

    from orderbook_store.files.lake_store import Lake

__all__ = ["LakeCatalog", "LakeRangeEntry", "lake_windows", "require_lake"]

CATALOG = LakeRange.__tablename__
_PRESENT_SQL = f"SELECT to_regclass('{CATALOG}') IS NOT NULL"
#: Dropped ranges overlapping ``[$1, $2)`` holding one of ``$3`` (any when NULL), with only
#: the files of those symbols (``$4``: their names as the layout escapes them) that were not
#: restored (``restored_files``: their rows are in PostgreSQL again).
_DROPPED_SQL = (
    "SELECT start_us, end_us, symbols, rows, lake_url, ARRAY(SELECT f FROM unnest(files) AS f"
    " WHERE f <> ALL(restored_files) AND ($4::text[] IS NULL"
    " OR split_part(split_part(f, '/symbol=', 2), '/', 1) = ANY($4::text[]))) AS files"
    f" FROM {CATALOG}"
    " WHERE dropped_at IS NOT NULL AND start_us < $2::bigint AND end_us > $1::bigint"
    " AND ($3::text[] IS NULL OR symbols::text[] && $3::text[])"
    " ORDER BY start_us"
)
#: Each symbol in a dropped range, and the end of the newest such range.
_NEWEST_SQL = (
    f"SELECT s.symbol, max(r.end_us) AS end_us FROM {CATALOG} r, unnest(r.symbols) AS s(symbol)"
    " WHERE r.dropped_at IS NOT NULL GROUP BY s.symbol"
)
_NO_LOWER = -(2**63)
_NO_UPPER = 2**63 - 1


@dataclass(frozen=True)
class LakeRangeEntry:
    """One dropped range of the catalog: ``[start_us, end_us)`` and its files."""

    start_us: int
    end_us: int
    symbols: frozenset[str]
    files: tuple[LakeFileRef, ...]
    lake_url: str
    rows: int = 0  # of every symbol

    def rows_of_one_symbol(self, start_us: int, end_us: int) -> int:
        """A rough estimate of one symbol's rows in ``[start_us, end_us)`` of this range (its
        rows spread evenly over its symbols and time): what a planner estimate is for."""
        overlap = max(0, min(end_us, self.end_us) - max(start_us, self.start_us))
        share = overlap / (self.end_us - self.start_us) / max(1, len(self.symbols))
        return int(self.rows * share)

    def files_of(
        self, symbol: str, exchange: str | None, start_us: int, end_us: int
    ) -> list[LakeFileRef]:
        """The files of ``symbol`` (of ``exchange``, or any) overlapping ``[start_us, end_us)``."""
        return [
            f
            for f in self.files
            if f.symbol == symbol
            and (exchange is None or f.exchange == exchange)
            and f.low_us < end_us
            and f.high_us > start_us
        ]


class LakeCatalog:
    """Reads the catalog inside a read's transaction; remembers only that the table exists
    (a database is upgraded past 0007 while readers run, never back below it in their
    lifetime; while absent, every read asks again)."""

    def __init__(self) -> None:
        self.present = False

    async def dropped(
        self,
        raw: asyncpg.Connection,
        start_us: int | None = None,
        end_us: int | None = None,
        symbols: Sequence[str] | None = None,
    ) -> list[LakeRangeEntry]:
        """The dropped ranges overlapping ``[start_us, end_us)`` (all when ``None``) that hold
        one of ``symbols`` (any when ``None``; with only their files), oldest first."""
        if not self.present:
            if not await raw.fetchval(_PRESENT_SQL):
                return []
            self.present = True
        names = None if symbols is None else list(symbols)
        rows = await raw.fetch(
            _DROPPED_SQL,
            _NO_LOWER if start_us is None else start_us,
            _NO_UPPER if end_us is None else end_us,
            names,
            None if names is None else [quote(name, safe="") for name in names],
        )
        return [
            LakeRangeEntry(
                int(r["start_us"]),
                int(r["end_us"]),
                frozenset(r["symbols"]),
                tuple(LakeFileRef.parse(p) for p in r["files"]),
                str(r["lake_url"]),
                int(r["rows"]),
            )
            for r in rows
        ]

    async def newest_by_symbol(self, raw: asyncpg.Connection) -> dict[str, int]:
        """Each symbol of a dropped range and the end of the newest one holding it (one
        query, no file lists: what ``latest()`` of every symbol needs first)."""
        if not self.present:
            if not await raw.fetchval(_PRESENT_SQL):
                return {}
            self.present = True
        return {str(r["symbol"]): int(r["end_us"]) for r in await raw.fetch(_NEWEST_SQL)}


def require_lake(lake: Lake | None, entries: Iterable[LakeRangeEntry]) -> Lake | None:
    """``lake``, or ``ConfigError`` when ``entries`` say rows are in a lake and none is set."""
    entries = list(entries)
    if lake is not None or not entries:
        return lake
    first, last = entries[0], entries[-1]
    raise ConfigError(
        f"quotes from {from_us(first.start_us).isoformat()} to {from_us(last.end_us).isoformat()}"
        f" are in the lake ({first.lake_url}; {CATALOG}: {len(entries)} dropped range(s)), but"
        " LAKE_URL is not set: set LAKE_URL to that lake to read them (or run"
        " `orderbook-store restore` for the range)"
    )


def lake_windows(
    entries: Iterable[LakeRangeEntry], symbol: str, start_us: int, end_us: int
) -> list[tuple[int, int, list[LakeRangeEntry]]]:
    """The parts of ``[start_us, end_us)`` that ``symbol`` has in the lake, in time order:
    ``(low, high, entries)`` with adjacent ranges joined."""
    out: list[tuple[int, int, list[LakeRangeEntry]]] = []
    for entry in sorted(entries, key=lambda e: e.start_us):
        if symbol not in entry.symbols:
            continue
        low, high = max(start_us, entry.start_us), min(end_us, entry.end_us)
        if low >= high:
            continue
        if out and out[-1][1] == low:
            out[-1] = (out[-1][0], high, [*out[-1][2], entry])
        else:
            out.append((low, high, [entry]))
    return out
