"""``orderbook_store.connect()``: the repository, synchronous, for notebooks and scripts.

Why a background thread: a notebook already runs an event loop in the main thread, so
``asyncio.run`` refuses to start and ``nest_asyncio`` patches the loop in ways that break other
libraries. Instead the store owns one daemon thread running its own event loop; the engine, its
pool and the repository are created *on that loop* (asyncpg connections belong to the loop that
opened them), and every method submits a coroutine there and waits for its result. That works
the same from a plain script, from a thread, and from inside a running loop (Jupyter). A call
made from inside a running loop blocks that loop while it waits, exactly like any synchronous
library call would.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from orderbook_store.engine import create_engine
from orderbook_store.read.sync_api import SyncReads
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from orderbook_store.quote import Quote

__all__ = ["OrderbookStore", "connect"]

T = TypeVar("T")


class OrderbookStore(SyncReads):
    """Synchronous ``OrderbookRepository``: the same read methods, plus bulk writes and count.

    Made by ``orderbook_store.connect()``. Close it (or use ``with``) to release the pool and
    stop its thread; an unclosed store's thread is a daemon and dies with the process.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="orderbook_store", daemon=True
        )
        self._thread.start()
        self._closed = False
        self._engine, self._repo = self._run(self._open())

    async def _open(self) -> tuple[AsyncEngine, OrderbookRepository]:
        engine = create_engine(self.settings)
        return engine, OrderbookRepository(engine, settings=self.settings)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("this OrderbookStore is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("OrderbookStore methods cannot be called from its own loop")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()

    # -- reads (read.sync_api: the repository's read methods, synchronous) ---------------

    def _async_reads(self) -> OrderbookRepository:
        return self._repo

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._run(coro)

    def _iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        """``stream`` as a plain iterator, one item fetched on the store's loop per step."""

        async def step() -> tuple[bool, T | None]:
            try:
                return True, await stream.__anext__()
            except StopAsyncIteration:
                return False, None

        async def close() -> None:
            await stream.aclose()  # type: ignore[attr-defined]

        try:
            while True:
                more, item = self._run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]
        finally:
            if not self._closed:
                self._run(close())

    # -- writes and counts ---------------------------------------------------------------

    def insert_many(self, rows: Iterable[Quote | Mapping[str, object]]) -> int:
        """``OrderbookRepository.insert_many``, synchronously: rows written."""
        materialized = list(rows)  # iterate in this thread, not the store's
        return self._run(self._repo.insert_many(materialized))

    def count(self, symbol: str | None = None) -> int:
        """``OrderbookRepository.count``, synchronously."""
        return self._run(self._repo.count(symbol))

    def close(self) -> None:
        """Flush, release the pool and stop the thread. Safe to call twice."""
        if self._closed:
            return

        async def shutdown() -> None:
            try:
                await self._repo.close()
            finally:
                await self._engine.dispose()

        try:
            self._run(shutdown())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> OrderbookStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"OrderbookStore({self.settings.describe()}, {state})"


def connect(settings: Settings | None = None) -> OrderbookStore:
    """A synchronous store on ``settings`` (``Settings()`` from the environment when omitted).

    Works in plain scripts and inside a running event loop (Jupyter) alike; see this module's
    docstring for how.
    """
    return OrderbookStore(settings)
