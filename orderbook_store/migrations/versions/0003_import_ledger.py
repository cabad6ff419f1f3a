"""orderbook_import_files: the ledger that makes file imports exactly-once

One entry per imported file, inserted in the same transaction as the file's rows. Its key is
the SHA-256 of the file's bytes together with what the importer took from the file's path
(the symbol of a Binance ``<SYMBOL>-bookTicker-<date>`` file, the hive partition values of a
Parquet file), so the same file imported again is recognised before any row is read, and a
run killed in the middle of a file left neither rows nor an entry behind. ``content_sha256``
hashes the decompressed content the same way (unique), so a recompressed or renamed copy of an
imported file is recognised once read, and its transaction rolled back. ``rows``,
``quarantined`` and the time range (``first_timestamp``/``last_timestamp``, microseconds) say
what the file contributed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "orderbook_import_files",
        sa.Column("file_sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("format", sa.String(40), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("quarantined", sa.BigInteger(), nullable=False),
        sa.Column("first_timestamp", sa.BigInteger(), nullable=True),
        sa.Column("last_timestamp", sa.BigInteger(), nullable=True),
        sa.Column("content_sha256", sa.String(64), nullable=True),
        sa.Column(
            "imported_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.PrimaryKeyConstraint("file_sha256", name="orderbook_import_files_pkey"),
        sa.UniqueConstraint("content_sha256", name="uq_orderbook_import_files_content_sha256"),
    )


def downgrade() -> None:
    op.drop_table("orderbook_import_files")
