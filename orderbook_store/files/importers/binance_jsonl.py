"""JSON lines of Binance USDⓈ-M futures ``bookTicker`` websocket messages, as a collector logs them.

One message per line, bare (``{"e":"bookTicker","E":...,"s":...,"b":...}``) or in the
combined-stream envelope (``{"stream":...,"data":{...}}``). ``timestamp`` = ``E`` × 1000.
The receive time, when the line has one, is ``local_timestamp``: the first of the keys
``local_timestamp``, ``receive_time``, ``recv_time``, ``received_at``, ``localTimestamp``
found on the line or in ``data``, as an integer whose unit is read from its size (13 digits:
milliseconds, 16: microseconds, 19: nanoseconds). Without one, ``local_timestamp`` = ``E`` ×
1000, the same rule as the Binance CSV dumps. ``exchange`` is ``binance-futures``.

A small file (up to 16 MB) holding one JSON document, a pretty-printed message or a list of
messages (as API examples are kept), is read too; a rejected message's "line" is then its
1-based position in the document.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Final

import pyarrow as pa

from orderbook_store.files.importers.base import ImportOptions, Reader
from orderbook_store.files.importers.rows import ROW_SCHEMA, Checked, check
from orderbook_store.files.importers.source import (
    Digest,
    ImportUnit,
    head_of,
    iter_lines,
    open_binary,
)
from orderbook_store.quote import DEFAULT_EXCHANGE

NAME: Final = "binance-bookticker-jsonl"
DESCRIPTION: Final = (
    "JSON lines of Binance futures bookTicker websocket messages "
    '({"e":"bookTicker","E":...,"s":...,"b":...,"B":...,"a":...,"A":...}, '
    "optional receive time)"
)

#: A file that is one JSON document (not JSON lines) is read whole, so only up to this size.
DOCUMENT_LIMIT: Final = 16 << 20

RECEIVE_TIME_KEYS: Final = (
    "local_timestamp",
    "receive_time",
    "recv_time",
    "received_at",
    "localTimestamp",
)
#: Each parsed line: where it came from, why it failed (if it did), then the table's columns.
_SCHEMA: Final = pa.schema(
    [("line", pa.int64()), ("text", pa.string()), ("error", pa.string()), *ROW_SCHEMA]
)


def _message(value: object) -> Mapping[str, object] | None:
    if not isinstance(value, Mapping):
        return None
    data = value.get("data")
    if "stream" in value and isinstance(data, Mapping):
        return data
    return value


def _looks_like_book_ticker(value: object) -> bool:
    message = _message(value)
    if message is None:
        return False
    return message.get("e") == "bookTicker" or {"s", "b", "B", "a", "A", "E"} <= set(message)


def to_microseconds(value: int) -> int:
    """An epoch time whose unit is read from its size, in microseconds."""
    if value < 10**14:
        return value * 1000
    if value < 10**17:
        return value
    return value // 1000


def _decimal_text(value: object) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, float):
        return repr(value)
    return str(value)


def parse_line(line: int, text: str) -> dict[str, object]:
    """One line as a candidate record (``error`` set when it is not a bookTicker message)."""
    record: dict[str, object] = {"line": line, "text": text}
    try:
        value = json.loads(text)
    except ValueError as exc:
        record["error"] = f"is not JSON ({exc})"
        return record
    message = _message(value)
    if message is None or message.get("e", "bookTicker") != "bookTicker":
        record["error"] = "is not a bookTicker message"
        return record
    assert isinstance(value, Mapping)
    event_time = message.get("E")
    if type(event_time) is not int or not 0 <= event_time < 2**53:
        record["error"] = f"invalid quote: E={event_time!r}: must be integer milliseconds"
        return record
    received: object = None
    for key in RECEIVE_TIME_KEYS:
        received = message.get(key, value.get(key))
        if received is not None:
            break
    if received is None:
        local = event_time * 1000
    elif type(received) is int and 0 <= received < 2**62:
        local = to_microseconds(received)
    else:
        record["error"] = f"invalid quote: receive time {received!r}: must be an integer"
        return record
    symbol = message.get("s")
    record.update(
        exchange=DEFAULT_EXCHANGE,
        symbol=symbol if isinstance(symbol, str) else None,
        timestamp=event_time * 1000,
        local_timestamp=local,
        ask_amount=_decimal_text(message.get("A")),
        ask_price=_decimal_text(message.get("a")),
        bid_price=_decimal_text(message.get("b")),
        bid_amount=_decimal_text(message.get("B")),
    )
    if record["symbol"] is None:
        record["error"] = f"invalid quote: symbol={symbol!r}: is required"
    return record


def _document(unit: ImportUnit) -> list[object] | None:
    """A small file holding one JSON document (a pretty-printed message, or a list of them)."""
    head = head_of(unit, DOCUMENT_LIMIT + 1)
    if len(head) > DOCUMENT_LIMIT:
        return None
    try:
        value = json.loads(head)
    except ValueError:
        return None
    messages = value if isinstance(value, list) else [value]
    if messages and all(_looks_like_book_ticker(message) for message in messages):
        return messages
    return None


def sniff(unit: ImportUnit, first_line: str, options: ImportOptions) -> Reader | None:
    """A reader when the first line is a JSON bookTicker message (or the file one document)."""
    if not first_line.lstrip().startswith(("{", "[")):
        return None
    try:
        value = json.loads(first_line)
    except ValueError:
        value = None
    if not _looks_like_book_ticker(value):
        if _document(unit) is None:
            return None

        def document_blocks(digest: Digest | None) -> Iterator[Checked]:
            with open_binary(unit, digest) as stream:
                text = stream.read().decode("utf-8")
            parsed = json.loads(text)
            messages = parsed if isinstance(parsed, list) else [parsed]
            records = [
                parse_line(number, json.dumps(message))
                for number, message in enumerate(messages, start=1)
            ]
            yield check(pa.Table.from_pylist(records, schema=_SCHEMA))

        return Reader(NAME, unit, document_blocks)

    def blocks(digest: Digest | None) -> Iterator[Checked]:
        with open_binary(unit, digest) as stream:
            for block in iter_lines(stream, 1 << 20):
                records = []
                for offset, raw in enumerate(block.lines.to_pylist()):
                    number = block.first_line + offset
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        records.append({"line": number, "error": "is not valid UTF-8 text"})
                        continue
                    if text.strip():
                        records.append(parse_line(number, text))
                yield check(pa.Table.from_pylist(records, schema=_SCHEMA))

    return Reader(NAME, unit, blocks)
