"""The old collector's storage API, unchanged, on top of the new write path.

The collector was written against three names: ``PostgreSQLManager(config)``,
``DataManager(config)`` and ``FileStorage``, each with ``connect()``, ``save_record(record)``
and ``shutdown()``. They keep working as they were called; underneath,

* ``PostgreSQLManager`` writes through :class:`~orderbook_store.repository.OrderbookRepository`
  (buffered, group-committed COPY, retry and spool) instead of ``executemany`` batches of 50;
* ``FileStorage`` writes daily CSV files per exchange and symbol in the tardis.dev ``quotes``
  layout, so the files can later be imported with the same tools as tardis downloads;
* ``DataManager`` picks one of the two from ``config["storage"]["type"]``.

A record is a mapping with the table's column names (``exchange`` optional), exactly what
:func:`orderbook_store.quote.to_row` accepts. A record that breaks a rule is logged (field,
value and reason; never configuration or secrets), counted in ``rejected`` and skipped:
``save_record`` returns ``False`` and the collector goes on, as it always did.

The config is the old JSON shape::

    {"storage": {"type": "postgresql"},
     "postgresql": {"host": ..., "port": 25060, "database": ..., "user": ...,
                    "password": "from_env", "pool_size": 10, "batch_size": 50},
     "file": {"base_dir": "data", "compress": false}}

``"password": "from_env"`` means ``DB_PASSWORD``; the other ``DB_*`` variables fill what the
config leaves out (see :meth:`Settings.from_collector_config`).
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO
from urllib.parse import quote as percent_encode

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.engine import create_engine
from orderbook_store.errors import ConfigError, InvalidQuote, OrderbookStoreError, WritesBlocked
from orderbook_store.models import QUOTE_COLUMNS
from orderbook_store.quote import QuoteRow, to_row
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.times import day_of
from orderbook_store.write.failures import FailureClass, RepeatFilter, classify

if TYPE_CHECKING:
    from _csv import Writer as CsvWriter

__all__ = ["DataManager", "FileStorage", "PostgreSQLManager", "StorageBackend"]

#: The old collector configured logging for "orderbook_store.compat": its name stays.
logger = logging.getLogger("orderbook_store.compat")

#: The header of a tardis.dev ``quotes`` CSV file, which is the table's column list.
CSV_HEADER: tuple[str, ...] = QUOTE_COLUMNS


class StorageBackend(Protocol):
    """What the collector calls on any storage."""

    async def connect(self) -> None: ...

    async def save_record(self, record: Mapping[str, object]) -> bool: ...

    async def shutdown(self) -> None: ...


def _section(config: Mapping[str, object], name: str) -> Mapping[str, object]:
    section = config.get(name, {})
    if not isinstance(section, Mapping):
        raise ConfigError(f"collector config: {name!r} must be an object, got {section!r}")
    return section


def _log_rejected(storage: str, exc: InvalidQuote, rejected: int) -> None:
    # The record's own values only (InvalidQuote shortens them); nothing from the config.
    logger.warning(
        "%s: record rejected (%d so far): %s",
        storage,
        rejected,
        exc,
        extra={"field": exc.field, "reason": exc.reason, "rejected": rejected},
    )


class PostgreSQLManager:
    """The old ``PostgreSQLManager``: ``connect()``, ``save_record(record)``, ``shutdown()``.

    ``save_record`` validates the record and hands it to the repository's buffered writer; it
    returns at once (``True``) and never waits for the database. Rows are committed in
    batches in the background and at ``shutdown()``, which flushes everything. Counters:
    ``saved`` and ``rejected``. Raises ``ConfigError`` for a config that cannot work.
    """

    def __init__(self, config: Mapping[str, object]) -> None:
        self.settings = Settings.from_collector_config(config)
        self.engine: AsyncEngine | None = None
        self.repository: OrderbookRepository | None = None
        self.saved = 0
        self.rejected = 0
        #: While writes are blocked, the ERROR line is repeated at most once a minute.
        self._blocked_said = RepeatFilter()

    async def connect(self) -> None:
        """Create the engine and the repository, and check the server once.

        An unreachable server is logged, not raised: the writer keeps quotes (in memory and
        the spool) and writes them once the server is back, so the collector can start.
        """
        if self.repository is not None:
            return
        self.engine = create_engine(self.settings)
        self.repository = OrderbookRepository(self.engine)
        await self.repository.__aenter__()
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:  # the message is the engine's, already password-free
            failure = classify(exc, user=self.settings.user, database=self.settings.name)
            if failure.kind is FailureClass.CONFIGURATION:
                logger.error(
                    "PostgreSQLManager: %s refuses this collector; to fix: %s. Quotes are "
                    "kept (in the spool) until it is fixed",
                    self.settings.describe(),
                    failure.fix,
                )
            else:
                logger.warning(
                    "PostgreSQLManager: %s is not reachable yet (%s); quotes are kept until it is",
                    self.settings.describe(),
                    type(exc).__name__,
                )

    async def save_record(self, record: Mapping[str, object]) -> bool:
        """Queue one record; ``False`` (logged and counted) if it breaks a rule.

        While the server refuses the collector for a reason that needs a fix (password,
        privileges, missing schema, TLS), records are still kept (in the spool) and ``True``
        is returned, and the cause and its fix are logged at ERROR (when it changes, then
        once a minute).
        """
        if self.repository is None:
            raise OrderbookStoreError("PostgreSQLManager.save_record() called before connect()")
        try:
            await self.repository.add(record)  # validates (to_row) and buffers; no I/O
        except InvalidQuote as exc:
            self.rejected += 1
            _log_rejected("PostgreSQLManager", exc, self.rejected)
            return False
        self.saved += 1
        blocked = self.repository.writes_blocked
        if blocked is not None and self._blocked_said.due(blocked):
            logger.error("PostgreSQLManager: quotes are kept but not stored: %s", blocked)
        return True

    async def shutdown(self) -> None:
        """Flush every saved record to the table, then release connections.

        Raises ``WritesBlocked`` (after logging it at ERROR with the fix) when the server
        refused the collector for a reason that needs a fix: the records are kept in the
        spool and written by the next start once it is fixed. Raises ``RowsLost`` if records
        could be neither written nor spooled.
        """
        repository, engine = self.repository, self.engine
        self.repository = self.engine = None
        try:
            if repository is not None:
                await repository.close()
        except WritesBlocked as exc:
            logger.error("PostgreSQLManager: shutdown: %s", exc)
            raise
        finally:
            if engine is not None:
                await engine.dispose()


def _path_part(value: str) -> str:
    """A file-name-safe spelling of an exchange or symbol (no separators, no ``..``)."""
    encoded = percent_encode(value, safe="-_.=+@")
    return encoded.replace(".", "%2E") if encoded in (".", "..") else encoded


class FileStorage:
    """Daily CSV files, one per exchange, symbol and UTC day, in the tardis ``quotes`` layout.

    Files are ``<base_dir>/<exchange>/<symbol>/<YYYY-MM-DD>.csv`` (``.csv.gz`` with
    ``compress``), split by ``local_timestamp`` as tardis.dev splits its files. Each starts
    with the header ``exchange,symbol,timestamp,local_timestamp,ask_amount,ask_price,
    bid_price,bid_amount``; an absent value is an empty cell. Decimals are written exactly as
    validated (``"9681.92"`` stays ``9681.92``). Reopening appends to the day's file (a gzip
    file gets another member, which every gzip reader reads as one stream).

    Writes go to buffered files; ``shutdown()`` (or ``flush()``) hands everything to the OS.
    """

    def __init__(
        self,
        config: Mapping[str, object] | None = None,
        *,
        base_dir: str | Path | None = None,
        compress: bool | None = None,
    ) -> None:
        section = _section(config or {}, "file")
        configured_dir = section.get("base_dir", section.get("directory", section.get("path")))
        directory = base_dir if base_dir is not None else configured_dir
        if directory is None:
            directory = "data"
        if not isinstance(directory, (str, Path)):
            raise ConfigError(f"collector config: file.base_dir must be a path, got {directory!r}")
        self.base_dir = Path(directory)
        configured_compress = section.get("compress", section.get("gzip", False))
        self.compress = bool(configured_compress if compress is None else compress)
        self.saved = 0
        self.rejected = 0
        self._open: dict[tuple[str, str], tuple[str, TextIO, CsvWriter]] = {}

    def path_for(self, exchange: str, symbol: str, day: dt.date) -> Path:
        """Where the quotes of ``exchange``/``symbol`` received on ``day`` (UTC) are written."""
        suffix = ".csv.gz" if self.compress else ".csv"
        return (
            self.base_dir / _path_part(exchange) / _path_part(symbol) / f"{day.isoformat()}{suffix}"
        )

    async def connect(self) -> None:
        """Create the base directory."""
        self.base_dir.mkdir(parents=True, exist_ok=True)

    def _writer_for(self, row: QuoteRow) -> CsvWriter:
        exchange, symbol, local_timestamp = row[0], row[1], row[3]
        day = day_of(local_timestamp)
        day_name = day.isoformat()
        key = (exchange, symbol)
        current = self._open.get(key)
        if current is not None:
            if current[0] == day_name:
                return current[2]
            current[1].close()  # a new day: the previous day's file is complete
        path = self.path_for(exchange, symbol, day)
        path.parent.mkdir(parents=True, exist_ok=True)
        is_new = not path.exists() or path.stat().st_size == 0
        handle: TextIO
        if self.compress:
            # Kept open across calls and closed by shutdown(), hence no ``with``.
            compressed = gzip.open(path, "ab")  # noqa: SIM115
            handle = io.TextIOWrapper(compressed, encoding="utf-8", newline="")
        else:
            handle = path.open("a", encoding="utf-8", newline="")
        writer = csv.writer(handle, lineterminator="\n")
        if is_new:
            writer.writerow(CSV_HEADER)
        self._open[key] = (day_name, handle, writer)
        return writer

    async def save_record(self, record: Mapping[str, object]) -> bool:
        """Append one record to its day's file; ``False`` (logged and counted) if invalid."""
        try:
            row = to_row(record)
        except InvalidQuote as exc:
            self.rejected += 1
            _log_rejected("FileStorage", exc, self.rejected)
            return False
        self._writer_for(row).writerow(["" if value is None else value for value in row])
        self.saved += 1
        return True

    def flush(self) -> None:
        """Hand buffered lines of every open file to the operating system."""
        for _, handle, _ in self._open.values():
            handle.flush()

    async def shutdown(self) -> None:
        """Close every open file (a gzip file gets its trailer)."""
        handles = [handle for _, handle, _ in self._open.values()]
        self._open.clear()
        for handle in handles:
            handle.close()


class DataManager:
    """The old ``DataManager``: the storage named by ``config["storage"]["type"]``.

    ``"postgresql"`` gives :class:`PostgreSQLManager`, ``"file"`` gives
    :class:`FileStorage`; anything else is a ``ConfigError``. ``connect``, ``save_record``
    and ``shutdown`` go to that storage, available as ``.storage``.
    """

    def __init__(self, config: Mapping[str, object]) -> None:
        kind = _section(config, "storage").get("type", "postgresql")
        self.storage: PostgreSQLManager | FileStorage
        if kind == "postgresql":
            self.storage = PostgreSQLManager(config)
        elif kind == "file":
            self.storage = FileStorage(config)
        else:
            raise ConfigError(
                f"collector config: storage.type={kind!r}; expected 'postgresql' or 'file'"
            )
        self.storage_type: str = kind

    @property
    def saved(self) -> int:
        """Records accepted by the storage so far."""
        return self.storage.saved

    @property
    def rejected(self) -> int:
        """Records rejected (logged and skipped) so far."""
        return self.storage.rejected

    async def connect(self) -> None:
        """Connect the storage (create the engine, or the base directory)."""
        await self.storage.connect()

    async def save_record(self, record: Mapping[str, object]) -> bool:
        """Save one record; ``False`` if it broke a rule (logged, counted, skipped)."""
        return await self.storage.save_record(record)

    async def shutdown(self) -> None:
        """Write out everything saved and release the storage."""
        await self.storage.shutdown()
