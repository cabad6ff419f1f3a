"""Binance public data: USDⓈ-M futures ``bookTicker`` daily CSV (``<SYMBOL>-bookTicker-<date>``).

Columns ``update_id,best_bid_price,best_bid_qty,best_ask_price,best_ask_qty,transaction_time,
event_time``, times in **milliseconds**; older files have no header line (recognised by their
first line: seven numbers, the last two 13-digit millisecond times). The file carries no
symbol: it comes from the file name (or the zip member's name), or from ``--symbol``.

Mapping, by the table's meaning of its columns: ``timestamp`` = ``event_time`` × 1000 (the
exchange's event time, as the websocket's ``E``); ``local_timestamp`` = ``event_time`` × 1000
too, because these files record no receive time; a file with an extra ``local_timestamp``
column (microseconds) gives it. ``exchange`` is ``binance-futures``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

from orderbook_store.files.importers.base import ImportOptions, Reader, RefusedFile
from orderbook_store.files.importers.csvlines import CsvLayout, read_csv, split_header
from orderbook_store.files.importers.rows import Checked
from orderbook_store.files.importers.source import Digest, ImportUnit, open_binary
from orderbook_store.quote import DEFAULT_EXCHANGE

NAME: Final = "binance-bookticker-csv"
DESCRIPTION: Final = (
    "Binance public data futures bookTicker CSV, <SYMBOL>-bookTicker-<date>.csv "
    "(update_id,best_bid_price,best_bid_qty,best_ask_price,best_ask_qty,transaction_time,"
    "event_time; milliseconds; header optional)"
)

HEADER: Final = (
    "update_id",
    "best_bid_price",
    "best_bid_qty",
    "best_ask_price",
    "best_ask_qty",
    "transaction_time",
    "event_time",
)
_HEADERLESS: Final = re.compile(r"[0-9]+,[0-9.]+,[0-9.]+,[0-9.]+,[0-9.]+,[0-9]{13},[0-9]{13}")
SYMBOL_FROM_NAME: Final = re.compile(r"([A-Z0-9_]{1,20})-bookTicker-[0-9]{4}-[0-9]{2}")


def symbol_from_name(name: str) -> str | None:
    """``BTCUSDT`` from ``BTCUSDT-bookTicker-2024-01-01.csv`` (or ``.zip``), else ``None``."""
    found = SYMBOL_FROM_NAME.match(name)
    return found.group(1) if found else None


def sniff(unit: ImportUnit, first_line: str, options: ImportOptions) -> Reader | None:
    """A reader for a bookTicker dump (with or without header); refuses one without symbol."""
    names = split_header(first_line)
    if tuple(names[: len(HEADER)]) == HEADER and set(names[len(HEADER) :]) <= {"local_timestamp"}:
        header_lines = 1
    elif _HEADERLESS.fullmatch(first_line.strip()):
        header_lines, names = 0, list(HEADER)
    else:
        return None
    symbol = options.symbol or symbol_from_name(unit.name) or symbol_from_name(unit.path.name)
    if symbol is None:
        raise RefusedFile(
            f"{unit.display}: a Binance bookTicker CSV names no symbol; name it "
            "<SYMBOL>-bookTicker-<YYYY-MM-DD>.csv or pass --symbol"
        )
    picks = {
        "bid_price": 1,
        "bid_amount": 2,
        "ask_price": 3,
        "ask_amount": 4,
        "timestamp": 6,
        "local_timestamp": names.index("local_timestamp") if "local_timestamp" in names else 6,
    }
    layout = CsvLayout(
        fields=len(names),
        picks=picks,
        constants={"exchange": DEFAULT_EXCHANGE, "symbol": symbol},
        header_lines=header_lines,
        timestamp_scale=1000,
        local_scale=1 if "local_timestamp" in names else 1000,
    )

    def blocks(digest: Digest | None) -> Iterator[Checked]:
        with open_binary(unit, digest) as stream:
            yield from read_csv(stream, layout)

    return Reader(NAME, unit, blocks, context={"symbol": symbol})
