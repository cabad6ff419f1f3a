"""Keeping ``orderbook_symbols`` (revision 0006) to the symbols still stored, after a prune.

The list only grows by itself (a trigger adds each new symbol). A symbol whose partitions were
all pruned would stay listed, and ``latest()`` would walk every partition to find nothing for
it: about 50 ms a symbol with 365 daily partitions. So ``prune`` forgets them.

Race-free against a writer storing such a symbol again: the list is locked ``EXCLUSIVE``, which
waits for every transaction whose trigger already looked at the list (it holds ``ROW
EXCLUSIVE`` on it until it ends) and holds off new ones; the check that follows takes its
snapshot after, so it sees their rows. Writers that insert meanwhile wait for the check, one
statement of some tens of milliseconds (planning it names every partition). The check runs
first without the lock, and the lock is taken only when it found a symbol to forget. When the
lock is not granted within ``LOCK_TIMEOUT_MS`` the list is left as it is (it is correct, only
longer) for the next prune.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.models import OrderbookData, OrderbookSymbol
from orderbook_store.write.failures import sqlstate_of

__all__ = ["forget_unstored_symbols"]

TABLE = OrderbookData.__tablename__
SYMBOLS = OrderbookSymbol.__tablename__

#: How long to wait for the list's lock before leaving it for the next prune.
LOCK_TIMEOUT_MS = 1000

#: Listed symbols (of ``:names``, or all) that no row holds. Each one's rows are looked for
#: partition by partition, stopping at the first row: a symbol still stored costs a descent or
#: two, one no longer stored a descent of every partition. (A LATERAL with LIMIT, so the
#: planner cannot make it an anti-join that reads every row of the table.)
_UNSTORED = f"""
SELECT l.symbol FROM {SYMBOLS} l
LEFT JOIN LATERAL (SELECT 1 AS found FROM {TABLE} o WHERE o.symbol = l.symbol LIMIT 1) f ON true
WHERE f.found IS NULL AND (CAST(:names AS text[]) IS NULL OR l.symbol = ANY (:names))
"""


async def forget_unstored_symbols(engine: AsyncEngine) -> list[str] | None:
    """Remove listed symbols that no row holds any more; returns them, sorted, or ``None``
    when the list is missing (before revision 0006) or stayed locked by others.

    The symbols are found first without a lock (usually none: nothing more to do); only those
    are checked again under the lock, and deleted.
    """
    async with engine.begin() as conn:
        listed = (await conn.execute(text(f"SELECT to_regclass('{SYMBOLS}')"))).scalar()
        if listed is None:
            return None
        await conn.execute(text("SET LOCAL enable_seqscan = off"))
        found = (await conn.execute(text(_UNSTORED), {"names": None})).scalars().all()
    if not found:
        return []
    async with engine.begin() as conn:
        await conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms'"))
        try:
            await conn.execute(text(f"LOCK TABLE {SYMBOLS} IN EXCLUSIVE MODE"))
        except DBAPIError as exc:
            if sqlstate_of(exc) != "55P03":
                raise
            return None
        await conn.execute(text("SET LOCAL enable_seqscan = off"))
        await conn.execute(text("SET LOCAL lock_timeout = 0"))
        gone = (
            (await conn.execute(text(_UNSTORED), {"names": [str(symbol) for symbol in found]}))
            .scalars()
            .all()
        )
        await conn.execute(
            text(f"DELETE FROM {SYMBOLS} WHERE symbol = ANY (:gone)"), {"gone": list(gone)}
        )
    return sorted(str(symbol) for symbol in gone)
