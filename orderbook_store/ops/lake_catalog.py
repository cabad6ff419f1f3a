"""The lake's catalog, ``orderbook_lake_ranges`` (revision 0007): which ranges the lake holds.

An entry is written once every file of an archived partition is written and verified (see
``ops.archive``), so an entry is a promise: the files it lists hold exactly ``rows`` rows with
``checksum`` (``files.lake_checksum``). ``dropped_at`` says the partition is gone from
PostgreSQL (``prune``), so reads take that range from the lake, all but ``restored_files``
(files ``restore`` brought back whole); ``restore`` clears both when the whole range is back.
The statements here take a connection, so a caller puts them in the
transaction that must hold them (the archive's lock, prune's drop).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from orderbook_store.models import LakeRange

__all__ = [
    "CATALOG",
    "LakeEntry",
    "clear_dropped",
    "entry_for",
    "mark_dropped",
    "note_restored",
    "overlapping",
    "record",
    "replace",
]

CATALOG = LakeRange.__tablename__

_COLUMNS = (
    "id, partition_name, start_us, end_us, symbols, rows, checksum, files, format_version, "
    "lake_url, archived_at, dropped_at, restored_files"
)


@dataclass(frozen=True)
class LakeEntry:
    """One archived range ``[start_us, end_us)`` and what the lake holds of it."""

    partition_name: str
    start_us: int
    end_us: int
    symbols: list[str]
    rows: int
    checksum: str
    files: list[str]
    format_version: int
    lake_url: str
    id: int | None = None
    archived_at: dt.datetime | None = None
    dropped_at: dt.datetime | None = None
    #: Files of a dropped range that ``restore`` brought back whole (reads skip them).
    restored_files: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> bool:
        """Whether the partition is gone from PostgreSQL (reads take the range from the lake)."""
        return self.dropped_at is not None


def _entry(row: Sequence[object]) -> LakeEntry:
    (id_, name, start, end, symbols, rows, checksum, files, version, url, archived, dropped) = row[
        :12
    ]
    return LakeEntry(
        partition_name=str(name),
        start_us=int(start),  # type: ignore[call-overload]
        end_us=int(end),  # type: ignore[call-overload]
        symbols=list(symbols),  # type: ignore[call-overload]
        rows=int(rows),  # type: ignore[call-overload]
        checksum=str(checksum),
        files=list(files),  # type: ignore[call-overload]
        format_version=int(version),  # type: ignore[call-overload]
        lake_url=str(url),
        id=int(id_),  # type: ignore[call-overload]
        archived_at=archived,  # type: ignore[arg-type]
        dropped_at=dropped,  # type: ignore[arg-type]
        restored_files=list(row[12]),  # type: ignore[call-overload]
    )


async def entry_for(conn: AsyncConnection, start_us: int, end_us: int) -> LakeEntry | None:
    """The entry of exactly ``[start_us, end_us)``, if the range is archived."""
    row = (
        await conn.execute(
            text(f"SELECT {_COLUMNS} FROM {CATALOG} WHERE start_us = :s AND end_us = :e"),
            {"s": start_us, "e": end_us},
        )
    ).first()
    return None if row is None else _entry(row)


async def overlapping(conn: AsyncConnection, start_us: int, end_us: int) -> list[LakeEntry]:
    """Entries whose range meets ``[start_us, end_us)``, oldest range first."""
    rows = await conn.execute(
        text(
            f"SELECT {_COLUMNS} FROM {CATALOG} WHERE start_us < :e AND end_us > :s "
            "ORDER BY start_us"
        ),
        {"s": start_us, "e": end_us},
    )
    return [_entry(row) for row in rows]


async def record(conn: AsyncConnection, entry: LakeEntry) -> None:
    """Insert a verified range (the unique range index refuses a second entry for it)."""
    await conn.execute(
        text(
            f"INSERT INTO {CATALOG} (partition_name, start_us, end_us, symbols, rows, checksum, "
            "files, format_version, lake_url) VALUES (:name, :start, :end, :symbols, :rows, "
            ":checksum, :files, :version, :url)"
        ),
        _values(entry),
    )


async def replace(conn: AsyncConnection, entry: LakeEntry) -> None:
    """Rewrite the entry of ``entry``'s range (a partition archived again after late rows)."""
    await conn.execute(
        text(
            f"UPDATE {CATALOG} SET partition_name = :name, symbols = :symbols, rows = :rows, "
            "checksum = :checksum, files = :files, format_version = :version, lake_url = :url, "
            "archived_at = now() WHERE start_us = :start AND end_us = :end"
        ),
        _values(entry),
    )


def _values(entry: LakeEntry) -> dict[str, object]:
    return {
        "name": entry.partition_name,
        "start": entry.start_us,
        "end": entry.end_us,
        "symbols": list(entry.symbols),
        "rows": entry.rows,
        "checksum": entry.checksum,
        "files": list(entry.files),
        "version": entry.format_version,
        "url": entry.lake_url,
    }


async def mark_dropped(conn: AsyncConnection, start_us: int, end_us: int) -> None:
    """Say the range's partition is gone from PostgreSQL: reads take it from the lake."""
    await conn.execute(
        text(f"UPDATE {CATALOG} SET dropped_at = now() WHERE start_us = :s AND end_us = :e"),
        {"s": start_us, "e": end_us},
    )


async def clear_dropped(conn: AsyncConnection, start_us: int, end_us: int) -> None:
    """Say the range's rows are in PostgreSQL again (restored, or the drop undone)."""
    await conn.execute(
        text(
            f"UPDATE {CATALOG} SET dropped_at = NULL, restored_files = '{{}}'"
            " WHERE start_us = :s AND end_us = :e"
        ),
        {"s": start_us, "e": end_us},
    )


async def note_restored(conn: AsyncConnection, start_us: int, end_us: int, relative: str) -> None:
    """Say a file of a dropped range is back in PostgreSQL whole: reads skip it from now on.
    Run in the transaction that stored its rows, so reads see the rows in one tier only."""
    await conn.execute(
        text(
            f"UPDATE {CATALOG} SET restored_files = array_append(restored_files, :f)"
            " WHERE start_us = :s AND end_us = :e AND dropped_at IS NOT NULL"
            " AND NOT (:f = ANY(restored_files))"
        ),
        {"s": start_us, "e": end_us, "f": relative},
    )
