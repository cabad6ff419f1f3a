"""Importers: every file format the team has, into ``orderbook_data``, exactly once per file.

``import_paths(engine, paths)`` detects each file's format from its content
(:mod:`.detect`), streams its rows through vectorized validation (:mod:`.rows`) into ``COPY``
(:mod:`.pipeline`), skipping quotes the table already holds (:mod:`.dedupe`), and records it
in the import ledger; ``verify_paths`` compares files with the database (:mod:`.verify`). One
module per format:

* :mod:`.tardis_quotes` — tardis.dev ``quotes`` CSV and the ``FileStorage`` daily files;
* :mod:`.tardis_book_snapshot` — tardis.dev ``book_snapshot_N`` CSV (level 0);
* :mod:`.binance_csv` — Binance public data futures ``bookTicker`` CSV;
* :mod:`.binance_jsonl` — JSON lines of Binance ``bookTicker`` websocket messages;
* :mod:`.parquet_tree` — Parquet, as ``orderbook-store export`` writes it.
"""

from __future__ import annotations

from orderbook_store.files.importers.base import ImportOptions, Reader, RefusedFile
from orderbook_store.files.importers.detect import FORMATS, detect, expand, known_formats
from orderbook_store.files.importers.pipeline import (
    FileResult,
    ImportProgress,
    ImportSummary,
    import_paths,
    import_unit,
)
from orderbook_store.files.importers.source import ImportUnit

__all__ = [
    "FORMATS",
    "FileResult",
    "ImportOptions",
    "ImportProgress",
    "ImportSummary",
    "ImportUnit",
    "Reader",
    "RefusedFile",
    "detect",
    "expand",
    "import_paths",
    "import_unit",
    "known_formats",
]
