"""orderbook_lake_ranges: the catalog of partitions archived to the lake

``archive`` writes each closed partition to the lake (``LAKE_URL``), reads every file back and
compares it with the partition (rows and checksum), and only then records the range here, in
one transaction: an entry means its files are complete and verified. ``prune`` drops only
partitions whose range has an entry, and stamps ``dropped_at``; reads then take that range
from the lake. ``restore`` brings files back (listed in ``restored_files``: reads take their
rows from PostgreSQL) and, once the whole range is back, clears ``dropped_at``.

The downgrade drops the table (the lake's files stay where they are).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "orderbook_lake_ranges"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("partition_name", sa.Text(), nullable=False),
        sa.Column("start_us", sa.BigInteger(), nullable=False),
        sa.Column("end_us", sa.BigInteger(), nullable=False),
        sa.Column("symbols", postgresql.ARRAY(sa.String(20)), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("files", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("format_version", sa.Integer(), nullable=False),
        sa.Column("lake_url", sa.Text(), nullable=False),
        sa.Column(
            "archived_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("dropped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "restored_files",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'"),
            nullable=False,
        ),
        sa.CheckConstraint("start_us < end_us", name=f"ck_{TABLE}_range"),
        sa.PrimaryKeyConstraint("id", name=f"{TABLE}_pkey"),
    )
    op.create_index(f"uq_{TABLE}_range", TABLE, ["start_us", "end_us"], unique=True)


def downgrade() -> None:
    op.drop_table(TABLE)
