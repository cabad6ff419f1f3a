"""Leaner indexes: no symbol-only btree, a BRIN on created_at

``idx_orderbook_symbol`` repeated the first column of ``idx_orderbook_symbol_timestamp``: every
query that could use it (the distinct-symbol skip scans, ``symbol = ...``) uses the composite
index as well, so it cost about 6.5 bytes a row and a write amplification for nothing. It is
dropped. ``created_at`` follows insert order, so a BRIN (a few bytes per 128 pages) answers a
range on it as well as the btree did (6.4 bytes a row), and it is what the index becomes.

The BRIN is built partition by partition ``CONCURRENTLY`` while writers carry on, then
attached to an index made ``ON ONLY`` the parent (PostgreSQL cannot build an index on a
partitioned table concurrently); only the drops and the renames take the table's lock, briefly
(asked for in attempts of 100 ms, so writers never queue long behind a reader of the table).
Offline (``--sql``) the index is built on the parent in one statement instead.

The downgrade restores 0004's two btrees, built on the parent (writers wait for the build).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from orderbook_store.migrations.table_lock import lock_table_patiently

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BRIN = "idx_orderbook_created_at"
BUILDING = "idx_orderbook_created_at_brin"

#: The partitions of orderbook_data, each with the name its BRIN gets.
PARTITIONS = """
SELECT c.relname, left('idx_orderbook_created_at_' || regexp_replace(c.relname,
       '^orderbook_data_', ''), 63) || '_brin'
FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
WHERE h.inhparent = 'orderbook_data'::regclass
ORDER BY c.relname
"""


def _tidy_names(*parents: str) -> str:
    """Names each partition's copy of these parent indexes ``<parent>_<partition suffix>``,
    as 0004 does (its TIDY_INDEX_NAMES), so plans read like the plain table's."""
    names = ", ".join(f"'{parent}'" for parent in parents)
    return f"""
DO $names$
DECLARE r record;
BEGIN
    FOR r IN
        SELECT child.relname AS child,
               left(parent.relname || '_' || regexp_replace(t.relname, '^orderbook_data_', ''),
                    63) AS wanted
        FROM pg_inherits h
        JOIN pg_class child ON child.oid = h.inhrelid
        JOIN pg_class parent ON parent.oid = h.inhparent
        JOIN pg_index x ON x.indexrelid = child.oid
        JOIN pg_class t ON t.oid = x.indrelid
        WHERE parent.relname IN ({names})
    LOOP
        IF r.child <> r.wanted THEN
            EXECUTE format('ALTER INDEX %I RENAME TO %I', r.child, r.wanted);
        END IF;
    END LOOP;
END
$names$
"""


def _build_brin_concurrently() -> None:
    bind = op.get_bind()
    op.execute(f"DROP INDEX IF EXISTS {BUILDING}")  # a leftover of an interrupted attempt
    op.execute(f"CREATE INDEX {BUILDING} ON ONLY orderbook_data USING brin (created_at)")
    for partition, index in bind.execute(sa.text(PARTITIONS)).all():
        op.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{index}"')
        op.execute(f'CREATE INDEX CONCURRENTLY "{index}" ON "{partition}" USING brin (created_at)')
        op.execute(f'ALTER INDEX {BUILDING} ATTACH PARTITION "{index}"')


def upgrade() -> None:
    if context.is_offline_mode():
        op.execute(f"CREATE INDEX {BUILDING} ON orderbook_data USING brin (created_at)")
    else:
        with op.get_context().autocommit_block():
            _build_brin_concurrently()
        # Asked in short attempts: writers never queue for long behind a reader of the table.
        op.execute(lock_table_patiently())
    op.execute("DROP INDEX idx_orderbook_symbol")
    op.execute(f"DROP INDEX {BRIN}")
    op.execute(f"ALTER INDEX {BUILDING} RENAME TO {BRIN}")
    # Each partition's copy named after its table, as 0004 names them.
    op.execute(_tidy_names(BRIN))


def downgrade() -> None:
    op.execute(f"DROP INDEX {BRIN}")
    op.create_index(BRIN, "orderbook_data", ["created_at"])
    op.create_index("idx_orderbook_symbol", "orderbook_data", ["symbol"])
    op.execute(_tidy_names(BRIN, "idx_orderbook_symbol"))
