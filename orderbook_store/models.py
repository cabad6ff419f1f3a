"""The ``orderbook_data`` table as SQLAlchemy 2 declarative models.

This module and the Alembic revisions are the one source of truth for the schema. Column
lists used by the fast COPY paths are derived from here (``QUOTE_COLUMNS``), never retyped.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Stable constraint and index names, so migrations never depend on names the server invents.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "%(table_name)s_pkey",
}

#: DECIMAL(20,8): 12 integer digits and 8 fractional ones, as the original table defines it.
PRICE = Numeric(20, 8)


class Base(DeclarativeBase):
    """Declarative base carrying the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class OrderbookData(Base):
    """One best bid/ask quote.

    ``timestamp`` is the exchange's event time and ``local_timestamp`` the collector's receive
    time, both integer microseconds since the Unix epoch, UTC.

    Since revision 0004 the table is range-partitioned on ``timestamp`` (see ``partitions``);
    PostgreSQL requires the partition key in the primary key, hence ``(id, timestamp)``. Ids
    still come from the one sequence, so ``id`` alone stays unique in practice.
    """

    __tablename__ = "orderbook_data"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    exchange: Mapped[str] = mapped_column(
        String(50), nullable=False, server_default=text("'binance-futures'::character varying")
    )
    symbol: Mapped[str] = mapped_column(String(20), nullable=False)
    timestamp: Mapped[int] = mapped_column(BigInteger, primary_key=True, nullable=False)
    local_timestamp: Mapped[int] = mapped_column(BigInteger, nullable=False)
    ask_amount: Mapped[Decimal | None] = mapped_column(PRICE)
    ask_price: Mapped[Decimal | None] = mapped_column(PRICE)
    bid_price: Mapped[Decimal | None] = mapped_column(PRICE)
    bid_amount: Mapped[Decimal | None] = mapped_column(PRICE)
    created_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=False), server_default=text("CURRENT_TIMESTAMP")
    )

    __table_args__ = (
        Index("idx_orderbook_symbol_timestamp", "symbol", "timestamp"),
        # created_at follows insert order: a BRIN is a few bytes per 128 pages (revision 0005).
        Index("idx_orderbook_created_at", "created_at", postgresql_using="brin"),
        {"postgresql_partition_by": "RANGE (timestamp)"},
    )


class OrderbookSymbol(Base):
    """Every symbol ``orderbook_data`` has held (revision 0006): what ``latest()`` of every
    symbol probes, instead of finding the symbols in each partition's index.

    A statement-level trigger on ``orderbook_data`` adds the symbols of each insert or COPY in
    the same transaction (see the revision); ``prune`` takes off a symbol no row holds any more.
    """

    __tablename__ = "orderbook_symbols"

    symbol: Mapped[str] = mapped_column(String(20), primary_key=True)


class LakeRange(Base):
    """The lake's catalog (revision 0007): one entry per partition archived to the lake.

    An entry exists only once every file of the range was written and verified against the
    partition (rows and checksum), so a killed archive leaves none. ``dropped_at`` is set when
    ``prune`` drops the partition: from then on reads take ``[start_us, end_us)`` from the
    lake's ``files`` (paths relative to the lake's root) but ``restored_files``, and a
    ``restore`` of the whole range clears it again.
    """

    __tablename__ = "orderbook_lake_ranges"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    partition_name: Mapped[str] = mapped_column(Text, nullable=False)
    start_us: Mapped[int] = mapped_column(BigInteger, nullable=False)
    end_us: Mapped[int] = mapped_column(BigInteger, nullable=False)
    symbols: Mapped[list[str]] = mapped_column(ARRAY(String(20)), nullable=False)
    rows: Mapped[int] = mapped_column(BigInteger, nullable=False)
    checksum: Mapped[str] = mapped_column(String(64), nullable=False)
    files: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False)
    format_version: Mapped[int] = mapped_column(Integer, nullable=False)
    lake_url: Mapped[str] = mapped_column(Text, nullable=False)
    archived_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("now()")
    )
    dropped_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    #: Files of a dropped range that ``restore`` brought back whole: reads take their rows
    #: from PostgreSQL, not from them (cleared with ``dropped_at`` once all are back).
    restored_files: Mapped[list[str]] = mapped_column(
        ARRAY(Text), nullable=False, server_default=text("'{}'")
    )

    __table_args__ = (
        CheckConstraint("start_us < end_us", name="range"),
        Index("uq_orderbook_lake_ranges_range", "start_us", "end_us", unique=True),
    )


_QUOTES = OrderbookData.__table__.columns

#: Every column of the table, in table order (what an archive of a partition holds).
TABLE_COLUMNS: tuple[str, ...] = tuple(c.name for c in _QUOTES)

#: The columns a quote carries, in table order: what writers send and readers return (every
#: column but the ones the server fills, ``id`` and ``created_at``).
QUOTE_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in _QUOTES if c.name not in ("id", "created_at")
)

#: Columns holding DECIMAL(20,8) values.
DECIMAL_COLUMNS: tuple[str, ...] = tuple(c.name for c in _QUOTES if isinstance(c.type, Numeric))

#: The most characters ``symbol`` and ``exchange`` hold (VARCHAR(20) and VARCHAR(50)).
SYMBOL_MAX_CHARS: int = _QUOTES["symbol"].type.length  # type: ignore[attr-defined]
EXCHANGE_MAX_CHARS: int = _QUOTES["exchange"].type.length  # type: ignore[attr-defined]

#: DECIMAL(precision, scale) of the four decimals: 12 integer digits and 8 fractional ones.
DECIMAL_PRECISION: int = PRICE.precision  # type: ignore[assignment]
DECIMAL_SCALE: int = PRICE.scale  # type: ignore[assignment]


def arrow_schema(
    columns: Sequence[str] = QUOTE_COLUMNS,
    *,
    times_as_timestamps: bool = False,
    decimals_as_text: bool = False,
) -> Any:
    """The ``pyarrow.Schema`` of ``columns``, derived from the table: the one place an Arrow or
    Parquet type is chosen for a column.

    Integers are int64 and text is string; ``timestamp`` and ``local_timestamp`` are int64
    microseconds, or ``timestamp[us, UTC]`` with ``times_as_timestamps``; decimals are exact
    ``decimal128(20, 8)``, or their text with ``decimals_as_text``; ``created_at`` (the server's
    naive local time) is ``timestamp[us]``.
    """
    import pyarrow as pa

    fields = []
    for name in columns:
        column = _QUOTES[name]
        kind: Any
        if isinstance(column.type, Numeric):
            kind = (
                pa.string() if decimals_as_text else pa.decimal128(DECIMAL_PRECISION, DECIMAL_SCALE)
            )
        elif isinstance(column.type, String):
            kind = pa.string()
        elif isinstance(column.type, DateTime):
            kind = pa.timestamp("us")
        elif name in ("timestamp", "local_timestamp") and times_as_timestamps:
            kind = pa.timestamp("us", tz="UTC")
        else:
            kind = pa.int64()
        fields.append((name, kind))
    return pa.schema(fields)


class WriteBatch(Base):
    """The writer's ledger: one entry per committed batch, inserted in the batch's transaction.

    A batch replayed from the spool whose id is already here was committed before (its COMMIT
    outcome was unknown to the writer) and is skipped, so no quote is stored twice. Entries are
    pruned by age (``committed_at``), cheaply, through the index.
    """

    __tablename__ = "orderbook_write_batches"

    batch_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    rows: Mapped[int] = mapped_column(Integer, nullable=False)
    committed_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("now()")
    )

    __table_args__ = (Index("ix_orderbook_write_batches_committed_at", "committed_at"),)


class ImportedFile(Base):
    """The importers' ledger: one entry per imported file, inserted in the file's transaction.

    ``file_sha256`` hashes the file's bytes plus what the importer read from its path (a
    symbol from a Binance file name, hive partition values), so importing the same file again
    is recognised before reading it and adds nothing; a file whose import was interrupted has
    no entry (and no rows) and is imported whole on the next run. ``content_sha256`` hashes the
    decompressed content likewise, so a recompressed copy of an imported file adds nothing too.
    """

    __tablename__ = "orderbook_import_files"

    file_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    format: Mapped[str] = mapped_column(String(40), nullable=False)
    rows: Mapped[int] = mapped_column(BigInteger, nullable=False)
    quarantined: Mapped[int] = mapped_column(BigInteger, nullable=False)
    first_timestamp: Mapped[int | None] = mapped_column(BigInteger)
    last_timestamp: Mapped[int | None] = mapped_column(BigInteger)
    content_sha256: Mapped[str | None] = mapped_column(String(64), unique=True)
    imported_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("now()")
    )
