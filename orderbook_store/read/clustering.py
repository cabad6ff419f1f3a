"""Whether a range read's rows are stored in symbol order: then one connection reads it best.

A compacted partition (``partitions compact``) holds its rows sorted by (symbol, timestamp,
id), so the index scan of one symbol reads the heap sequentially: measured warm, the server's
work per row falls to about half, close to what the client spends decoding the row. One server
process then keeps the client's decoder busy, and a second connection only adds its own setup
(snapshot export, a second plan of every partition) and competes with the decoder for CPU: on
2 cores a 30-day read of compacted partitions ran ~20% slower on two connections than on one.
Where a symbol's rows are scattered (the plain table, a partition still being written, an
uncompacted history partition) each row costs the server a random heap access, the server is
the limit, and two connections stay the faster read.

The signal is the planner's own statistic: ``pg_stats.correlation`` of ``symbol`` in each
relation the read's plan touches (1 when the heap is in symbol order), weighted by the rows
the plan expects from it. A relation without statistics counts as scattered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg

#: Row-weighted correlation of ``symbol`` at or above which the read counts as clustered.
CLUSTERED_MIN_CORRELATION = 0.9

_CORRELATION_SQL = (
    "SELECT tablename, correlation FROM pg_stats"
    " WHERE attname = 'symbol' AND tablename = ANY($1::text[])"
    " AND schemaname = ANY(current_schemas(false))"
)


def planned_relations(plan: Mapping[str, object]) -> dict[str, float]:
    """Relation name -> rows the plan expects to read from it, for every scan in ``plan``
    (the ``"Plan"`` node of ``EXPLAIN (FORMAT JSON)``)."""
    found: dict[str, float] = {}
    pending: list[Mapping[str, object]] = [plan]
    while pending:
        node = pending.pop()
        name = node.get("Relation Name")
        if isinstance(name, str):
            rows = node.get("Plan Rows", 0)
            found[name] = found.get(name, 0.0) + float(rows if isinstance(rows, int | float) else 0)
        children = node.get("Plans")
        if isinstance(children, list):
            pending.extend(c for c in children if isinstance(c, Mapping))
    return found


async def stored_in_symbol_order(raw: asyncpg.Connection, relations: Mapping[str, float]) -> bool:
    """Whether the relations' rows (weighted as given) sit in symbol order on disk."""
    total = sum(relations.values())
    if total <= 0:
        return False
    rows = await raw.fetch(_CORRELATION_SQL, list(relations))
    correlation = {str(r["tablename"]): r["correlation"] for r in rows}
    weighted = sum(
        weight * abs(float(correlation.get(name) or 0.0)) for name, weight in relations.items()
    )
    return weighted / total >= CLUSTERED_MIN_CORRELATION
