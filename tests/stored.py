"""Quotes as multisets: what was added vs what the table holds, compared whole."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from decimal import Decimal

import asyncpg

from orderbook_store.models import QUOTE_COLUMNS
from orderbook_store.quote import QuoteRow, to_row
from orderbook_store.settings import Settings

Row = tuple[object, ...]


def as_multiset(rows: Iterable[QuoteRow]) -> Counter[Row]:
    """Rows as the database returns them (Decimal for numerics), counted."""
    return Counter(
        (*row[:4], *(None if v is None else Decimal(v) for v in row[4:]))  # type: ignore[arg-type]
        for row in rows
    )


def expected(quote_dicts: Iterable[Mapping[str, object]]) -> Counter[Row]:
    """What the table should hold after these quotes were added, each once."""
    return as_multiset(to_row(q) for q in quote_dicts)


async def stored_multiset(settings: Settings) -> Counter[Row]:
    """What the table holds."""
    conn = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        records = await conn.fetch(
            "SELECT " + ", ".join(f'"{c}"' for c in QUOTE_COLUMNS) + " FROM orderbook_data"
        )
    finally:
        await conn.close()
    return Counter(tuple(r) for r in records)
