"""orderbook_store: best bid/ask quotes in PostgreSQL.

from orderbook_store import Settings, create_engine, OrderbookRepository
engine = create_engine(Settings())
async with OrderbookRepository(engine) as repo:
    await repo.add(quote)
"""

from __future__ import annotations

from .engine import create_engine
from .errors import ConfigError, DatabaseUnavailable, InvalidQuote, OrderbookStoreError
from .repository import OrderbookRepository
from .settings import Settings
from .sync import connect as connect

__all__ = [
    "ConfigError",
    "DatabaseUnavailable",
    "InvalidQuote",
    "OrderbookRepository",
    "OrderbookStoreError",
    "Settings",
    "create_engine",
]
