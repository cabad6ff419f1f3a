"""What every format module provides, and the one error a refused file raises."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from orderbook_store.errors import OrderbookStoreError
from orderbook_store.files.importers.rows import Checked
from orderbook_store.files.importers.source import Digest, ImportUnit


class RefusedFile(OrderbookStoreError):
    """A file the importers will not read (unknown format, or a needed fact is missing).

    The message names the file, what was wrong, and the formats that are known.
    """


@dataclass(frozen=True)
class ImportOptions:
    """Choices the caller can make for files that do not carry everything themselves."""

    #: The symbol of Binance bookTicker CSV files whose name does not give it.
    symbol: str | None = None


@dataclass
class Reader:
    """A recognised file: its format, what was taken from its path, and how to read it.

    ``blocks()`` yields validated blocks (a few MB each) in file order; reading again starts
    over, so ``verify`` and ``import`` see exactly the same rows.
    """

    format: str
    unit: ImportUnit
    open_blocks: Callable[[Digest | None], Iterator[Checked]]
    context: dict[str, str] = field(default_factory=dict)

    def blocks(self, digest: Digest | None = None) -> Iterator[Checked]:
        """Validated blocks; with ``digest``, the file's content is fed to it as it is read."""
        return self.open_blocks(digest)
