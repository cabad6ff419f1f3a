"""orderbook_store: best bid/ask quotes in PostgreSQL.

from orderbook_store import Settings, create_engine, OrderbookRepository, Quote
engine = create_engine(Settings())
async with OrderbookRepository(engine) as repo:
    await repo.add(quote)                   # buffered; returns at once
    df = await repo.quotes("BTCUSDT", "2024-01-01", "2024-01-02")

store = orderbook_store.connect()           # the same, synchronous, for notebooks
"""

from __future__ import annotations

from .engine import create_engine
from .errors import ConfigError, DatabaseUnavailable, InvalidQuote, OrderbookStoreError
from .quote import Quote
from .repository import OrderbookRepository
from .settings import Settings
from .sync import connect

__all__ = [
    "ConfigError",
    "DatabaseUnavailable",
    "InvalidQuote",
    "OrderbookRepository",
    "OrderbookStoreError",
    "Quote",
    "Settings",
    "connect",
    "create_engine",
]
