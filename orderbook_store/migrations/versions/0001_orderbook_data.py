"""orderbook_data: the quotes table exactly as the original plan defines it

A database made by hand from the original DDL is adopted with ``alembic stamp 0001``.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "orderbook_data",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
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
        sa.PrimaryKeyConstraint("id", name="orderbook_data_pkey"),
    )
    op.create_index("idx_orderbook_symbol_timestamp", "orderbook_data", ["symbol", "timestamp"])
    op.create_index("idx_orderbook_created_at", "orderbook_data", ["created_at"])
    op.create_index("idx_orderbook_symbol", "orderbook_data", ["symbol"])


def downgrade() -> None:
    op.drop_table("orderbook_data")
