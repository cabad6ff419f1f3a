"""What every ``orderbook-store`` command shares: one engine per command, made and disposed,
and one way to print for people, where text from the server, files or settings is text."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from rich.console import Console
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.engine import create_engine
from orderbook_store.settings import Settings

__all__ = ["run_with_engine", "text_console"]

T = TypeVar("T")


def run_with_engine(work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run ``work`` on an engine made from ``Settings()`` (``DB_*``, ``.env``,
    ``DATABASE_URL``) in a fresh event loop; the engine is disposed however ``work`` ends."""

    async def main() -> T:
        engine = create_engine(Settings())
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def text_console(*, stderr: bool = False) -> Console:
    """A console that prints strings as they are: a ``[/x]`` in a database name, a file name
    or a server message is shown, never read as Rich markup (styles go in ``Text`` objects)."""
    return Console(stderr=stderr, markup=False, highlight=False, emoji=False)
