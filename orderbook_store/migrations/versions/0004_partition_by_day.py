"""orderbook_data partitioned by range of timestamp: daily (or weekly/monthly) partitions

The table becomes ``PARTITION BY RANGE (timestamp)`` (integer microseconds, UTC) without
rewriting a row:

0. while writers carry on, each step its own short transaction: the unique index on
   ``(id, timestamp)`` that PostgreSQL requires (the partition key must be in every unique key)
   is built ``CONCURRENTLY``, the only index built; a ``CHECK`` on the period-aligned range of
   the timestamps (bounds found by two index probes per symbol; the range reaches a period past
   the newest row or the hour to come, whichever is later, so the live collector's rows meet
   it) is added ``NOT VALID`` (a brief lock, taken with a short ``lock_timeout`` and retried)
   and validated, which takes only SHARE UPDATE EXCLUSIVE: inserts go on during the scan,
   and the CHECK holds every row from then on. Then, in one short transaction holding the
   table's lock (asked for in attempts of 100 ms, so writers never queue long behind a
   reader that holds the table):
1. the old table is renamed ``orderbook_data_history``; its indexes are renamed
   (``idx_orderbook_symbol_history``, ...) so the parent can take their names; its primary key
   ``(id)`` is replaced by ``(id, timestamp)`` using the index from step 0;
2. the partitioned parent takes the old name, the columns, the ``id`` sequence (ids continue),
   the primary key ``(id, timestamp)`` and the three index names; the old table is attached as
   the one historical partition (the valid CHECK proves its range, so ``ATTACH`` skips its
   scan, and its indexes are adopted, not rebuilt), partitions for the current period and the
   next seven are created, and a ``DEFAULT`` partition catches rows outside every range, so a
   writer never fails for a missing partition.

The historical partition's range is aligned to whole periods, so rows later written into it
(the rest of the day the upgrade ran, or late data for an old day) are routed there, as they
belong; it is pruned once all of it is older than the cutoff. An empty table is simply replaced.

The period comes from ``alembic -x period=week`` or ``DB_PARTITION_PERIOD`` (``day``, ``week``
or ``month``; default ``day``), read at upgrade time. Writers wait (they do not fail) only while
the last transaction holds the lock, a fraction of a second whatever the table's size. A row
older than the oldest stored one written during the validation is refused by the CHECK (the
writer dead-letters it). Offline (``--sql``), or when the table was empty at step 0, the index
is built and the range proven inside the locked transaction instead.

The downgrade copies every row, with its id, back into a plain table of exactly revision
0001's shape.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from orderbook_store.migrations.table_lock import lock_table_patiently
from orderbook_store.write.failures import sqlstate_of

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: period name -> (date_trunc unit, interval of one period)
PERIODS = {"day": ("day", "1 day"), "week": ("week", "7 days"), "month": ("month", "1 month")}

#: How many periods after the current one get a partition at upgrade time.
AHEAD = 7

INDEXES = {
    "idx_orderbook_symbol_timestamp": ("symbol", "timestamp"),
    "idx_orderbook_created_at": ("created_at",),
    "idx_orderbook_symbol": ("symbol",),
}


def _period() -> tuple[str, str]:
    """The partition period chosen for this upgrade: ``-x period=...``, then the settings'
    ``partition_period`` (where ``Settings`` has that field), then ``DB_PARTITION_PERIOD``."""
    settings = context.config.attributes.get("settings")
    chosen = str(
        context.get_x_argument(as_dictionary=True).get("period")
        or getattr(settings, "partition_period", None)
        or os.environ.get("DB_PARTITION_PERIOD")
        or "day"
    ).lower()
    if chosen not in PERIODS:
        raise ValueError(
            f"partition period {chosen!r} (alembic -x period=... or DB_PARTITION_PERIOD) "
            f"must be one of {', '.join(PERIODS)}"
        )
    return PERIODS[chosen]


def _columns(id_default: str) -> list[sa.Column[object]]:
    return [
        sa.Column("id", sa.BigInteger(), nullable=False, server_default=sa.text(id_default)),
        sa.Column(
            "exchange",
            sa.String(50),
            nullable=False,
            server_default=sa.text("'binance-futures'::character varying"),
        ),
        sa.Column("symbol", sa.String(20), nullable=False),
        sa.Column("timestamp", sa.BigInteger(), nullable=False),
        sa.Column("local_timestamp", sa.BigInteger(), nullable=False),
        sa.Column("ask_amount", sa.Numeric(20, 8)),
        sa.Column("ask_price", sa.Numeric(20, 8)),
        sa.Column("bid_price", sa.Numeric(20, 8)),
        sa.Column("bid_amount", sa.Numeric(20, 8)),
        sa.Column("created_at", sa.DateTime(), server_default=sa.text("CURRENT_TIMESTAMP")),
    ]


#: The unique index on (id, timestamp) that becomes the historical partition's primary key.
KEY_INDEX = "orderbook_data_id_timestamp_key"

NEXTVAL = "nextval('orderbook_data_id_seq'::regclass)"

# Microseconds <-> UTC timestamps, exactly (integer interval arithmetic, numeric epoch).
TS = "('epoch'::timestamp + ({0}) * interval '1 microsecond')"
US = "(extract(epoch FROM ({0})) * 1000000)::bigint"


#: Names each partition's copy of a parent index ``<parent index>_<partition suffix>``
#: (``idx_orderbook_symbol_timestamp_p20240101``), so plans read like the plain table's.
TIDY_INDEX_NAMES = """
DO $names$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT child.relname AS child,
               left(parent.relname || '_' || regexp_replace(t.relname, '^orderbook_data_', ''), 63)
                   AS wanted
        FROM pg_inherits h
        JOIN pg_class child ON child.oid = h.inhrelid
        JOIN pg_class parent ON parent.oid = h.inhparent
        JOIN pg_index x ON x.indexrelid = child.oid
        JOIN pg_class t ON t.oid = x.indrelid
        WHERE parent.relname IN (
            'idx_orderbook_symbol_timestamp', 'idx_orderbook_created_at', 'idx_orderbook_symbol')
    LOOP
        IF r.child <> r.wanted THEN
            EXECUTE format('ALTER INDEX %I RENAME TO %I', r.child, r.wanted);
        END IF;
    END LOOP;
END
$names$
"""


#: The stored timestamps' bounds, one index probe pair per symbol (no full scan).
STORED_BOUNDS = """
WITH RECURSIVE symbols(symbol) AS (
    (SELECT symbol FROM {table} ORDER BY symbol LIMIT 1)
    UNION ALL
    SELECT (SELECT h.symbol FROM {table} h
            WHERE h.symbol > s.symbol ORDER BY h.symbol LIMIT 1)
    FROM symbols s WHERE s.symbol IS NOT NULL
)
SELECT min(r.lo), max(r.hi)
FROM symbols s
CROSS JOIN LATERAL (
    SELECT min(h."timestamp") AS lo, max(h."timestamp") AS hi
    FROM {table} h WHERE h.symbol = s.symbol
) r
WHERE s.symbol IS NOT NULL
"""

#: The range CHECK proven while writers carry on: it ends a period after the newest row or the
#: hour to come, whichever is later, so the live collector's rows meet it while it is checked.
RANGE_CHECK = "orderbook_data_history_range"
#: Waits for the brief lock that adds the CHECK (a writer queues behind a waiting request).
ADD_CHECK_LOCK_TIMEOUT = "100ms"
#: How long it keeps asking (a reader may hold the table for minutes) before it fails.
ADD_CHECK_GIVE_UP_S = 600


def _prove_range_online(unit: str, step: str) -> tuple[int, int] | None:
    """Add the history's range CHECK ``NOT VALID`` and validate it outside the exclusive lock
    (``VALIDATE`` takes only SHARE UPDATE EXCLUSIVE: inserts go on). Returns the range, or
    None for an empty table. Runs in autocommit: each step its own short transaction."""
    bind = op.get_bind()
    found = bind.execute(sa.text(STORED_BOUNDS.format(table="orderbook_data"))).first()
    if found is None or found[0] is None:
        return None
    trunc_lo = f"date_trunc('{unit}', {TS.format(':lo')})"
    newest = f"greatest({TS.format(':hi')}, now() AT TIME ZONE 'UTC' + interval '1 hour')"
    trunc_hi = f"date_trunc('{unit}', {newest}) + interval '{step}'"
    lo, hi = bind.execute(
        sa.text(f"SELECT {US.format(trunc_lo)}, {US.format(trunc_hi)}"),
        {"lo": found[0], "hi": found[1]},
    ).one()
    bind.execute(sa.text(f"SET lock_timeout = '{ADD_CHECK_LOCK_TIMEOUT}'"))
    try:
        deadline = time.monotonic() + ADD_CHECK_GIVE_UP_S
        while True:
            try:
                bind.execute(
                    sa.text(
                        # (one of an interrupted attempt is replaced in the same statement)
                        f"ALTER TABLE orderbook_data DROP CONSTRAINT IF EXISTS {RANGE_CHECK}, "
                        f"ADD CONSTRAINT {RANGE_CHECK} "
                        f'CHECK ("timestamp" >= {int(lo)} AND "timestamp" < {int(hi)}) NOT VALID'
                    )
                )
                break
            except sa.exc.DBAPIError as exc:
                if sqlstate_of(exc) != "55P03" or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # lock_timeout: let the writers queued behind it go first
    finally:
        bind.execute(sa.text("RESET lock_timeout"))
    bind.execute(sa.text(f"ALTER TABLE orderbook_data VALIDATE CONSTRAINT {RANGE_CHECK}"))
    return int(lo), int(hi)


def upgrade() -> None:
    unit, step = _period()
    key_index_built = False
    proven: tuple[int, int] | None = None
    if not context.is_offline_mode():
        # The one index this upgrade must build, and the proof of the history's range, both
        # while writers carry on (CONCURRENTLY cannot run inside a transaction). A leftover of
        # an interrupted attempt is replaced.
        with op.get_context().autocommit_block():
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {KEY_INDEX}")
            op.execute(
                f'CREATE UNIQUE INDEX CONCURRENTLY {KEY_INDEX} ON orderbook_data (id, "timestamp")'
            )
            proven = _prove_range_online(unit, step)
        key_index_built = True

    # Asked in short attempts: writers never queue for long behind a reader holding the table.
    op.execute(lock_table_patiently())
    op.execute("ALTER TABLE orderbook_data RENAME TO orderbook_data_history")
    for name in INDEXES:
        op.execute(f"ALTER INDEX {name} RENAME TO {name}_history")
    op.execute("ALTER TABLE orderbook_data_history DROP CONSTRAINT orderbook_data_pkey")
    if not key_index_built:  # offline (--sql): built under the lock instead
        op.execute(f'CREATE UNIQUE INDEX {KEY_INDEX} ON orderbook_data_history (id, "timestamp")')
    # Takes the index as it is (renamed to the constraint's name): no scan, no build.
    op.execute(
        "ALTER TABLE orderbook_data_history ADD CONSTRAINT orderbook_data_history_pkey "
        f"PRIMARY KEY USING INDEX {KEY_INDEX}"
    )

    op.create_table(
        "orderbook_data",
        *_columns(NEXTVAL),
        sa.PrimaryKeyConstraint("id", "timestamp", name="orderbook_data_pkey"),
        postgresql_partition_by="RANGE (timestamp)",
    )
    op.execute("ALTER SEQUENCE orderbook_data_id_seq OWNED BY orderbook_data.id")
    for name, columns in INDEXES.items():
        op.create_index(name, "orderbook_data", list(columns))

    if proven is not None:
        # Proven above while writers carried on; the CHECK has held every row since.
        find_range = f"lo := {proven[0]}; hi := {proven[1]};"
    else:
        # Offline, or a table that was empty a moment ago: prove it here, under the lock.
        lo_ts = TS.format("lo")
        hi_ts = TS.format("hi")
        find_range = f"""
    {STORED_BOUNDS.format(table="orderbook_data_history").strip()} INTO lo, hi;
    IF lo IS NOT NULL THEN
        lo := {US.format(f"date_trunc('{unit}', {lo_ts})")};
        hi := {US.format(f"date_trunc('{unit}', {hi_ts}) + interval '{step}'")};
        EXECUTE format(
            'ALTER TABLE orderbook_data_history ADD CONSTRAINT {RANGE_CHECK} '
            'CHECK ("timestamp" >= %s AND "timestamp" < %s) NOT VALID', lo, hi);
        ALTER TABLE orderbook_data_history VALIDATE CONSTRAINT {RANGE_CHECK};
    END IF;"""
    op.execute(
        f"""
DO $partition$
DECLARE
    lo bigint;
    hi bigint;
    period_start timestamp;
    a bigint;
    b bigint;
BEGIN
    {find_range}

    IF lo IS NULL THEN
        DROP TABLE orderbook_data_history;
    ELSE
        -- The valid CHECK proves the range: ATTACH skips its own scan.
        EXECUTE format(
            'ALTER TABLE orderbook_data ATTACH PARTITION orderbook_data_history '
            'FOR VALUES FROM (%s) TO (%s)', lo, hi);
        ALTER TABLE orderbook_data_history DROP CONSTRAINT {RANGE_CHECK};
    END IF;

    period_start := date_trunc('{unit}', now() AT TIME ZONE 'UTC');
    FOR i IN 0..{AHEAD} LOOP
        a := {US.format("period_start")};
        b := {US.format(f"period_start + interval '{step}'")};
        IF lo IS NULL OR b <= lo OR a >= hi THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF orderbook_data FOR VALUES FROM (%s) TO (%s)',
                'orderbook_data_p' || to_char(period_start, 'YYYYMMDD'), a, b);
        END IF;
        period_start := period_start + interval '{step}';
    END LOOP;
END
$partition$
"""
    )
    op.execute("CREATE TABLE orderbook_data_default PARTITION OF orderbook_data DEFAULT")
    op.execute(TIDY_INDEX_NAMES)


#: PostgreSQL 18+ records NOT NULL as named constraints. The plain table was created while the
#: partitioned one still held the default names, so its got a suffix; give them the names the
#: original DDL gets. (Nothing to do before 18: no such constraints.)
_NOT_NULL_NAMES_AS_CREATED_BY_HAND = """
DO $$
DECLARE r record;
BEGIN
    FOR r IN
        SELECT c.conname, 'orderbook_data_' || a.attname || '_not_null' AS wanted
        FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
        WHERE c.conrelid = 'orderbook_data'::regclass AND c.contype = 'n'
    LOOP
        IF r.conname <> r.wanted THEN
            EXECUTE format('ALTER TABLE orderbook_data RENAME CONSTRAINT %I TO %I',
                           r.conname, r.wanted);
        END IF;
    END LOOP;
END $$;
"""


def downgrade() -> None:
    op.execute("LOCK TABLE orderbook_data IN ACCESS EXCLUSIVE MODE")
    op.rename_table("orderbook_data", "orderbook_data_partitioned")
    op.create_table("orderbook_data", *_columns(NEXTVAL))
    op.execute("ALTER SEQUENCE orderbook_data_id_seq OWNED BY orderbook_data.id")
    columns = ", ".join(f'"{c.name}"' for c in _columns(NEXTVAL))
    op.execute(
        f"INSERT INTO orderbook_data ({columns}) SELECT {columns} FROM orderbook_data_partitioned"
    )
    op.drop_table("orderbook_data_partitioned")
    op.execute(_NOT_NULL_NAMES_AS_CREATED_BY_HAND)
    op.create_primary_key("orderbook_data_pkey", "orderbook_data", ["id"])
    for name, index_columns in INDEXES.items():
        op.create_index(name, "orderbook_data", list(index_columns))
