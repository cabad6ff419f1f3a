"""orderbook_store: best bid/ask quotes in PostgreSQL.

from orderbook_store import Settings, create_engine, OrderbookRepository, Quote
engine = create_engine(Settings())
async with OrderbookRepository(engine) as repo:
    await repo.add(quote)                   # buffered; returns at once
    df = await repo.quotes("BTCUSDT", "2024-01-01", "2024-01-02")

store = orderbook_store.connect()           # the same, synchronous, for notebooks
"""

from __future__ import annotations

from orderbook_store.engine import create_engine
from orderbook_store.errors import (
    ConfigError,
    DatabaseUnavailable,
    InvalidArgument,
    InvalidQuote,
    OrderbookStoreError,
    RowsLost,
    SchemaNotMigrated,
    SymbolCaseWarning,
    WriterBackpressure,
    WriterClosed,
    WritesBlocked,
)
from orderbook_store.quote import Quote
from orderbook_store.read.features import with_features
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.sync import OrderbookStore, connect
from orderbook_store.write.stats import WriterStats

__all__ = [
    "ConfigError",
    "DatabaseUnavailable",
    "InvalidArgument",
    "InvalidQuote",
    "OrderbookRepository",
    "OrderbookStore",
    "OrderbookStoreError",
    "Quote",
    "RowsLost",
    "SchemaNotMigrated",
    "Settings",
    "SymbolCaseWarning",
    "WriterBackpressure",
    "WriterClosed",
    "WriterStats",
    "WritesBlocked",
    "connect",
    "create_engine",
    "with_features",
]
