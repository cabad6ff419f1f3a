"""Archiving a detached partition to Parquet before ``partitions prune`` drops it.

The file is written under a temporary name, read back and compared with the partition (rows
and the sum of ids) before it gets its final name: a partition is only dropped once its
archive is proven.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.models import TABLE_COLUMNS, arrow_schema
from orderbook_store.pg.connection import raw_connection
from orderbook_store.times import day_of

if TYPE_CHECKING:
    from orderbook_store.ops.partitions import PartitionInfo

__all__ = ["archive_partition"]


def _arrow_schema() -> Any:
    """The Parquet schema of an archive: every column of the table, decimals exact."""
    return arrow_schema(TABLE_COLUMNS)


async def archive_partition(
    engine: AsyncEngine, part: PartitionInfo, archive_dir: Path, rows: int
) -> Path:
    """Write a detached partition to Parquet and prove the file holds every row; raises
    ``PartitionError`` (the file is then not left under its final name)."""
    from orderbook_store.ops.partitions import PartitionError  # its module imports this one

    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - depends on the installation
        raise PartitionError(
            "archiving needs pyarrow: pip install 'orderbook_store[arrow]'"
        ) from None
    assert part.start_us is not None
    folder = archive_dir / f"period_start={day_of(part.start_us).isoformat()}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{part.name}.parquet"
    serial = 0
    while path.exists():
        serial += 1
        path = folder / f"{part.name}-{serial}.parquet"
    partial = path.with_suffix(".parquet.partial")
    schema = _arrow_schema()
    columns = ", ".join(f'"{c}"' for c in TABLE_COLUMNS)
    written = 0
    id_sum_db = 0
    async with engine.connect() as conn:
        raw = await raw_connection(conn)
        id_sum_db = int(await raw.fetchval(f'SELECT coalesce(sum(id), 0) FROM "{part.name}"'))
        with pq.ParquetWriter(partial, schema) as writer:
            async with raw.transaction(isolation="repeatable_read", readonly=True):
                cursor = await raw.cursor(
                    f'SELECT {columns} FROM "{part.name}" ORDER BY "timestamp", id'
                )
                while True:
                    chunk = await cursor.fetch(100_000)
                    if not chunk:
                        break
                    arrays = [
                        pa.array([record[i] for record in chunk], type=schema.field(i).type)
                        for i in range(len(TABLE_COLUMNS))
                    ]
                    writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
                    written += len(chunk)
    stored = pq.ParquetFile(partial)
    stored_rows = stored.metadata.num_rows
    id_sum_file = int(pc.sum(stored.read(columns=["id"]).column("id")).as_py() or 0)
    if not (stored_rows == written == rows and id_sum_file == id_sum_db):
        partial.unlink(missing_ok=True)
        raise PartitionError(
            f"archive of {part.name} holds {stored_rows} rows (id sum {id_sum_file}), "
            f"the partition {rows} (id sum {id_sum_db}); nothing was dropped"
        )
    partial.replace(path)
    return path
