"""Put a partition in the lake the way ``archive`` + ``prune`` leave it, in one function.

``move_partition_to_lake`` writes the partition's rows in the lake format (``LakeFile``, one
file per exchange, symbol and UTC date), records the range in ``orderbook_lake_ranges`` with
``dropped_at`` set, and detaches and drops the partition, in one transaction. It stands in for
``orderbook-store archive`` followed by ``partitions prune`` so the read tests do not depend
on them; once those exist, this one function is what changes.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import asyncpg
import pyarrow as pa

from orderbook_store.files.lake_format import (
    FILE_COLUMNS,
    FORMAT_VERSION,
    LakeFile,
    day_bounds,
    day_dir,
    day_of_us,
    file_name,
)
from orderbook_store.files.lake_store import Lake
from orderbook_store.models import arrow_schema
from orderbook_store.settings import Settings

#: The exact sums the catalog's checksum covers (see lake-context: count, id, times, values).
_SUMS_SQL = (
    "SELECT count(*), sum(id), sum(timestamp), sum(local_timestamp), sum(ask_amount),"
    ' sum(ask_price), sum(bid_price), sum(bid_amount) FROM "{name}"'
)


async def move_partition_to_lake(settings: Settings, lake: Lake, start_us: int, end_us: int) -> int:
    """Archive the partition ``[start_us, end_us)`` to ``lake`` and drop it; returns its rows."""
    conn = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE orderbook_data IN ACCESS EXCLUSIVE MODE")
            name = await conn.fetchval(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'orderbook_data'::regclass"
                " AND pg_get_expr(c.relpartbound, c.oid) = $1",
                f"FOR VALUES FROM ('{start_us}') TO ('{end_us}')",
            )
            assert name is not None, f"no partition [{start_us}, {end_us})"
            rows = await conn.fetch(
                f'SELECT exchange, symbol, {", ".join(FILE_COLUMNS)} FROM "{name}"'
                " ORDER BY exchange, symbol, timestamp, id"
            )
            groups: dict[tuple[str, str, object], list[asyncpg.Record]] = defaultdict(list)
            for row in rows:
                groups[(row["exchange"], row["symbol"], day_of_us(row["timestamp"]))].append(row)
            schema = arrow_schema(FILE_COLUMNS)
            files = []
            for (exchange, symbol, day), members in sorted(groups.items()):
                low, high = day_bounds(day, start_us, end_us)  # type: ignore[arg-type]
                target = LakeFile(lake, f"{day_dir(exchange, symbol, day)}/{file_name(low, high)}")  # type: ignore[arg-type]
                target.write(
                    pa.table(
                        {c: [m[c] for m in members] for c in FILE_COLUMNS},
                        schema=schema,
                    )
                )
                files.append(target.commit())
            sums = await conn.fetchrow(_SUMS_SQL.format(name=name))
            checksum = hashlib.sha256("|".join(str(v) for v in sums).encode()).hexdigest()
            await conn.execute(
                "INSERT INTO orderbook_lake_ranges (partition_name, start_us, end_us, symbols,"
                " rows, checksum, files, format_version, lake_url, dropped_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now())",
                name,
                start_us,
                end_us,
                sorted({symbol for _, symbol, _ in groups}),
                len(rows),
                checksum,
                files,
                FORMAT_VERSION,
                lake.url,
            )
            await conn.execute(f'ALTER TABLE orderbook_data DETACH PARTITION "{name}"')
            await conn.execute(f'DROP TABLE "{name}"')
        return len(rows)
    finally:
        await conn.close()
