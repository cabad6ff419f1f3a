"""Put a partition in the lake the way the operator does: ``archive``, then ``prune``.

``move_partition_to_lake`` archives the partition of ``[start_us, end_us)`` to the lake
(``ops.archive``: its files written and verified, its range recorded in
``orderbook_lake_ranges``), then prunes it (``partitions.prune`` with the lake: checked against
its archive, detached, dropped and marked dropped in one transaction). The read tests use it to
move days to the lake.
"""

from __future__ import annotations

from orderbook_store.engine import create_engine
from orderbook_store.files.lake_store import Lake
from orderbook_store.ops import archive, partitions
from orderbook_store.settings import Settings
from orderbook_store.times import from_us


async def move_partition_to_lake(settings: Settings, lake: Lake, start_us: int, end_us: int) -> int:
    """Archive the partition ``[start_us, end_us)`` to ``lake`` and drop it; returns its rows."""
    engine = create_engine(settings)
    try:
        found = [
            p
            for p in await partitions.list_partitions(engine)
            if (p.start_us, p.end_us) == (start_us, end_us)
        ]
        assert len(found) == 1, f"no partition [{start_us}, {end_us})"
        await archive.archive_partition(engine, lake, found[0].name, start_us, end_us)
        pruned = await partitions.prune(engine, from_us(end_us), lake=lake)
        assert pruned.dropped == [found[0].name], pruned.dropped
        return pruned.rows
    finally:
        await engine.dispose()
