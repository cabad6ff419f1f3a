"""orderbook_write_batches: the ledger that makes the writer's batches exactly-once

Every batch the writer commits inserts its id here in the same transaction as its rows. A batch
whose COMMIT outcome was unknown (connection lost at the wrong moment, process killed) is
replayed from the spool later; its id already being here means "already written, skip".
``committed_at`` is indexed so old entries are pruned cheaply (the writer deletes entries older
than its ``ledger_retention``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "orderbook_write_batches",
        sa.Column("batch_id", sa.Uuid(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column(
            "committed_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.PrimaryKeyConstraint("batch_id", name="orderbook_write_batches_pkey"),
    )
    op.create_index(
        "ix_orderbook_write_batches_committed_at", "orderbook_write_batches", ["committed_at"]
    )


def downgrade() -> None:
    op.drop_table("orderbook_write_batches")
