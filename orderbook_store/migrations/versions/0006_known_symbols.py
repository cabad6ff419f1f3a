"""orderbook_symbols: every symbol ever stored, kept by a statement-level trigger

``latest()`` of every symbol used to find the symbols with a skip scan of each partition's
``(symbol, timestamp)`` index: ``partitions x (symbols + 1)`` index descents, about 200 ms with
365 daily partitions. This small table names each symbol once, so ``latest()`` reads it and
probes each symbol newest partition first.

It is kept by an ``AFTER INSERT ... FOR EACH STATEMENT`` trigger on ``orderbook_data`` whose
transition table holds the statement's rows: one ``INSERT ... SELECT DISTINCT symbol ... ON
CONFLICT DO NOTHING`` per statement (a COPY is one statement), in the writer's transaction,
so a symbol is listed exactly when its rows are visible. On the partitioned parent it fires for
every insert and COPY through the parent (every writer and importer); rows put into a
partition directly are rows moved between partitions (``compact``, ``ensure``), whose symbols
are listed already. The function runs as the table's owner (``SECURITY DEFINER`` with a fixed
``search_path``), so a writer role needs no privilege beyond ``INSERT`` on ``orderbook_data``.
A refused row fails its statement before the trigger runs; the trigger cannot refuse a row
the table took (the column is the table's ``VARCHAR(20)``).

Symbols only, not ``(exchange, symbol)``: no index leads with ``exchange``, so listing the pairs
of a stored table would read every row, and ``latest()`` answers per symbol. ``prune`` takes
off a symbol whose rows were all pruned (``ops.symbols``); until then ``latest()`` finds no
quote for it and leaves it out.

The table is made and the trigger created in one short transaction (it waits for writers in
flight, then writers carry on), then filled from the rows already stored, in a transaction of
its own, with a skip scan (one descent of each partition's index per symbol, never a scan of
the rows): rows committed before the trigger existed are seen by the fill, later ones are
listed by the trigger. Offline (``--sql``) the fill runs in the same transaction.

The downgrade drops the trigger, its function and the table.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "orderbook_symbols"
FUNCTION = "orderbook_symbols_note"
TRIGGER = "orderbook_symbols_note"

#: The function, created with the table's schema written into it (a SECURITY DEFINER
#: function must not resolve names through the caller's search_path).
CREATE_FUNCTION = f"""
DO $create$
BEGIN
    EXECUTE format($fn$
CREATE FUNCTION %1$I.{FUNCTION}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
BEGIN
    INSERT INTO %1$I.{TABLE} (symbol)
    SELECT DISTINCT n.symbol FROM new_quotes n
    ON CONFLICT (symbol) DO NOTHING;
    RETURN NULL;
END
$body$
$fn$, current_schema());
END
$create$
"""

CREATE_TRIGGER = f"""
CREATE TRIGGER {TRIGGER} AFTER INSERT ON orderbook_data
REFERENCING NEW TABLE AS new_quotes
FOR EACH STATEMENT EXECUTE FUNCTION {FUNCTION}()
"""

#: Every stored symbol, one index descent (of each partition) per symbol.
FILL = f"""
INSERT INTO {TABLE} (symbol)
WITH RECURSIVE s(symbol) AS (
    (SELECT o.symbol FROM orderbook_data o ORDER BY o.symbol, o."timestamp" LIMIT 1)
    UNION ALL
    SELECT (SELECT o.symbol FROM orderbook_data o WHERE o.symbol > s.symbol
            ORDER BY o.symbol, o."timestamp" LIMIT 1)
    FROM s WHERE s.symbol IS NOT NULL
)
SELECT s.symbol FROM s WHERE s.symbol IS NOT NULL
ON CONFLICT (symbol) DO NOTHING
"""


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("symbol", sa.String(20), nullable=False),
        sa.PrimaryKeyConstraint("symbol", name=f"{TABLE}_pkey"),
    )
    op.execute(CREATE_FUNCTION)
    op.execute(CREATE_TRIGGER)
    if context.is_offline_mode():
        op.execute(FILL)
        return
    # The trigger is committed first: every row committed after this lists its symbol itself,
    # and the fill's snapshot sees every row committed before.
    with op.get_context().autocommit_block():
        op.execute("SET enable_seqscan = off")
        op.execute(FILL)
        op.execute("RESET enable_seqscan")


def downgrade() -> None:
    op.execute(f"DROP TRIGGER {TRIGGER} ON orderbook_data")
    op.execute(f"DROP FUNCTION {FUNCTION}()")
    op.drop_table(TABLE)
