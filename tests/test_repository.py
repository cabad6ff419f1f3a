"""The repository's bulk write and count, on real data."""

from __future__ import annotations

import csv
import gzip
from decimal import Decimal
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.models import DECIMAL_COLUMNS, QUOTE_COLUMNS, OrderbookData
from orderbook_store.repository import OrderbookRepository


def read_real_rows(path: Path) -> list[dict[str, object]]:
    """The file's rows with integer timestamps and exact Decimal prices."""
    with gzip.open(path, "rt", newline="") as fh:
        return [
            {
                **row,
                "timestamp": int(row["timestamp"]),
                "local_timestamp": int(row["local_timestamp"]),
                **{c: Decimal(row[c]) for c in DECIMAL_COLUMNS},
            }
            for row in csv.DictReader(fh)
        ]


async def test_insert_many_writes_the_real_file_exactly(
    repo: OrderbookRepository, engine: AsyncEngine, real_quotes_path: Path
) -> None:
    rows = read_real_rows(real_quotes_path)
    assert len(rows) == 9_999

    written = await repo.insert_many(rows)

    assert written == 9_999
    assert await repo.count() == 9_999
    assert await repo.count("BTCUSDT") == 9_999
    assert await repo.count("ETHUSDT") == 0
    async with engine.connect() as conn:
        stored = (
            await conn.execute(
                select(*(getattr(OrderbookData, c) for c in QUOTE_COLUMNS)).order_by(
                    OrderbookData.id
                )
            )
        ).all()
    assert [tuple(s) for s in stored] == [tuple(r[c] for c in QUOTE_COLUMNS) for r in rows]


async def test_count_is_zero_on_an_empty_table(repo: OrderbookRepository) -> None:
    assert await repo.count() == 0
