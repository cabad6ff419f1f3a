"""Which format a file is in, read from its content (never from its name alone).

Compression first (gzip, zip, or none, from the magic bytes; Parquet by its ``PAR1`` magic),
then the first line of the decompressed text: a header naming known columns, a Binance dump's
headerless numbers, or a JSON bookTicker message. A file nothing recognises is refused with a
message that lists the formats known.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from orderbook_store.files.importers import (
    binance_csv,
    binance_jsonl,
    parquet_tree,
    tardis_book_snapshot,
    tardis_quotes,
)
from orderbook_store.files.importers.base import ImportOptions, Reader, RefusedFile
from orderbook_store.files.importers.source import ImportUnit, compression_of, head_of, units_of

_TEXT_FORMATS: Final[tuple[Callable[[ImportUnit, str, ImportOptions], Reader | None], ...]] = (
    tardis_quotes.sniff,
    tardis_book_snapshot.sniff,
    binance_csv.sniff,
    binance_jsonl.sniff,
)

#: Every known format: name -> what it looks like (shown when a file is refused).
FORMATS: Final[dict[str, str]] = {
    tardis_quotes.NAME: tardis_quotes.DESCRIPTION,
    tardis_book_snapshot.NAME: tardis_book_snapshot.DESCRIPTION,
    binance_csv.NAME: binance_csv.DESCRIPTION,
    binance_jsonl.NAME: binance_jsonl.DESCRIPTION,
    parquet_tree.NAME: parquet_tree.DESCRIPTION,
}


def known_formats() -> str:
    """The known formats, one per line, for messages."""
    return "\n".join(f"  - {name}: {text}" for name, text in FORMATS.items())


def refuse_unknown(unit: ImportUnit, why: str) -> RefusedFile:
    """The refusal of a file no format recognises; it names the known formats."""
    return RefusedFile(
        f"{unit.display}: unknown format ({why}); known formats (plain, .gz or .zip): "
        f"{', '.join(FORMATS)}"
    )


def detect(unit: ImportUnit, options: ImportOptions | None = None) -> Reader:
    """The reader for ``unit``; raises :class:`RefusedFile` naming the known formats."""
    options = options or ImportOptions()
    if unit.member is None and compression_of(unit.path) == "parquet":
        return parquet_tree.sniff(unit, options)
    try:
        head = head_of(unit)
    except (OSError, EOFError) as exc:
        raise refuse_unknown(unit, f"cannot be read: {exc}") from None
    if not head.strip():
        raise refuse_unknown(unit, "it is empty")
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        first_line = first.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse_unknown(unit, "its first line is not UTF-8 text") from None
    for sniff in _TEXT_FORMATS:
        reader = sniff(unit, first_line, options)
        if reader is not None:
            return reader
    shown = first_line if len(first_line) <= 80 else first_line[:77] + "..."
    raise refuse_unknown(unit, f"first line {shown!r}")


def expand(paths: list[Path]) -> Iterator[ImportUnit]:
    """Files and directories (walked recursively, sorted, hidden files skipped) as units."""
    for given in paths:
        path = given.absolute()  # the ledger and the quarantine name files unambiguously
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(name for name in dirs if not name.startswith("."))
                for name in sorted(files):
                    if not name.startswith((".", "_")):
                        yield from units_of(Path(root) / name)
        else:
            yield from units_of(path)
