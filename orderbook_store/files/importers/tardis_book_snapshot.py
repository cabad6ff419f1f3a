"""tardis.dev ``book_snapshot_N`` CSV: level 0 of each side is the best bid/ask quote.

Header ``exchange,symbol,timestamp,local_timestamp,asks[0].price,asks[0].amount,bids[0].price,
bids[0].amount,asks[1].price,...``; only level 0 is read, deeper levels are not quotes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from orderbook_store.files.importers.base import ImportOptions, Reader
from orderbook_store.files.importers.csvlines import CsvLayout, read_csv, split_header
from orderbook_store.files.importers.rows import Checked
from orderbook_store.files.importers.source import Digest, ImportUnit, open_binary

NAME: Final = "tardis-book-snapshot"
DESCRIPTION: Final = (
    "tardis.dev book_snapshot_N CSV (header exchange,symbol,timestamp,local_timestamp,"
    "asks[0].price,asks[0].amount,bids[0].price,bids[0].amount,...; level 0 is read)"
)

_LEVEL_ZERO: Final = {
    "ask_price": "asks[0].price",
    "ask_amount": "asks[0].amount",
    "bid_price": "bids[0].price",
    "bid_amount": "bids[0].amount",
}


def sniff(unit: ImportUnit, first_line: str, options: ImportOptions) -> Reader | None:
    """A reader when the header has the snapshot's level-0 columns."""
    names = split_header(first_line)
    wanted = ["exchange", "symbol", "timestamp", "local_timestamp", *_LEVEL_ZERO.values()]
    if not set(wanted) <= set(names) or not any(name.startswith("asks[") for name in names):
        return None
    picks = {name: names.index(name) for name in ("exchange", "symbol", "timestamp")}
    picks["local_timestamp"] = names.index("local_timestamp")
    for column, header in _LEVEL_ZERO.items():
        picks[column] = names.index(header)
    layout = CsvLayout(fields=len(names), picks=picks, header_lines=1)

    def blocks(digest: Digest | None) -> Iterator[Checked]:
        with open_binary(unit, digest) as stream:
            yield from read_csv(stream, layout)

    return Reader(NAME, unit, blocks)
