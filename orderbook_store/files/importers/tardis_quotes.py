"""tardis.dev ``quotes`` CSV, and the ``FileStorage`` daily files (the same layout).

Header ``exchange,symbol,timestamp,local_timestamp,ask_amount,ask_price,bid_price,bid_amount``:
the table's own columns, timestamps in microseconds, an empty cell for no value. Columns are
taken by name, so a file with them in another order, without ``exchange`` (the table's
default applies) or with ``id``/``created_at`` (ignored, as a ``psql`` export has) reads too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from orderbook_store.files.importers.base import ImportOptions, Reader
from orderbook_store.files.importers.csvlines import CsvLayout, read_csv, split_header
from orderbook_store.files.importers.rows import Checked
from orderbook_store.files.importers.source import Digest, ImportUnit, open_binary
from orderbook_store.models import DECIMAL_COLUMNS, QUOTE_COLUMNS

NAME: Final = "tardis-quotes"
DESCRIPTION: Final = (
    "tardis.dev quotes CSV or FileStorage daily file "
    "(header exchange,symbol,timestamp,local_timestamp,ask_amount,ask_price,bid_price,bid_amount)"
)

_REQUIRED: Final = frozenset({"symbol", "timestamp", "local_timestamp", *DECIMAL_COLUMNS})
_IGNORED: Final = frozenset({"id", "created_at"})


def sniff(unit: ImportUnit, first_line: str, options: ImportOptions) -> Reader | None:
    """A reader when the first line is a header naming the table's columns."""
    names = split_header(first_line)
    known = set(QUOTE_COLUMNS) | _IGNORED
    if not set(names) >= _REQUIRED or not set(names) <= known or len(set(names)) != len(names):
        return None
    layout = CsvLayout(
        fields=len(names),
        picks={name: names.index(name) for name in QUOTE_COLUMNS if name in names},
        header_lines=1,
    )

    def blocks(digest: Digest | None) -> Iterator[Checked]:
        with open_binary(unit, digest) as stream:
            yield from read_csv(stream, layout)

    return Reader(NAME, unit, blocks)
