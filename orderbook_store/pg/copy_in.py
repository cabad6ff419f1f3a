"""PostgreSQL ``COPY ... FROM STDIN`` text encoding of validated quote rows.

Text format rather than binary: the decimals already are exact decimal strings (see
:func:`orderbook_store.quote.to_row`), and the server parses text ``numeric`` faster than a
client can build binary ``numeric`` digit groups in Python. A batch is encoded with one
f-string per row and one join, so the cost per quote is a fraction of a microsecond.

Framing follows the server's rules for the text format: columns separated by a tab, rows
ended by a newline, ``\\N`` for NULL, and in data values a backslash, tab, newline or carriage
return written as ``\\\\``, ``\\t``, ``\\n``, ``\\r``. The validator already rejects control
characters in ``exchange`` and ``symbol``; escaping them anyway keeps any string, whatever its
origin, a literal.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from orderbook_store.models import QUOTE_COLUMNS, OrderbookData
from orderbook_store.quote import QuoteRow

__all__ = [
    "COPY_COLUMNS",
    "COPY_STATEMENT",
    "MAX_ROW_BYTES",
    "NULL",
    "copy_columns",
    "copy_lines",
    "copy_statement",
    "decode_copy_line",
    "encode_copy_text",
    "escape_text",
]

#: The column list a COPY of quote rows names, in :data:`~orderbook_store.quote.QuoteRow`
#: order (``models.QUOTE_COLUMNS``): pass it as ``columns=`` to asyncpg's ``copy_to_table``.
COPY_COLUMNS: Final[tuple[str, ...]] = QUOTE_COLUMNS

#: NULL in COPY text format.
NULL: Final = "\\N"

_ESCAPES: Final = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_UNESCAPES: Final = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}

#: The most bytes one validated row takes in COPY text: exchange (50 characters of up to four
#: UTF-8 bytes), symbol (20), two 16-digit timestamps, four decimals of at most 21 characters
#: (``quote.to_row`` never lets a longer one through) and the separators come to 404. A batch
#: of ``n`` rows therefore never exceeds ``n * MAX_ROW_BYTES`` bytes, which is how the writer
#: bounds batches and spool records in bytes without measuring them.
MAX_ROW_BYTES: Final = 512


def copy_columns() -> list[str]:
    """The COPY column list as a new list (asyncpg wants a sequence it may keep)."""
    return list(COPY_COLUMNS)


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def copy_statement(table: str = OrderbookData.__tablename__) -> str:
    """``COPY orderbook_data ("exchange", ...) FROM STDIN`` for raw drivers that take SQL.

    ``table`` is quoted as one identifier; identifiers are always quoted because
    ``timestamp`` is also a type name.
    """
    columns = ", ".join(_quote_identifier(name) for name in COPY_COLUMNS)
    return f"COPY {_quote_identifier(table)} ({columns}) FROM STDIN"


#: The statement for the ``orderbook_data`` table.
COPY_STATEMENT: Final = copy_statement()


def escape_text(value: str) -> str:
    """One string as a COPY text data value (backslash, tab, newline and CR escaped)."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_ESCAPES)
    return value


def _escaped_into(cache: dict[str, str], value: str) -> str:
    escaped = cache[value] = escape_text(value)
    return escaped


def encode_copy_text(rows: Iterable[QuoteRow]) -> bytes:
    """Encode rows (from :func:`~orderbook_store.quote.to_row`) as COPY text, UTF-8.

    Columns are :data:`COPY_COLUMNS`. Decimals are written as given (exact strings) and
    ``None`` as NULL; exchange and symbol are escaped, once per distinct value in the batch.
    Costs well under a microsecond per row (see ``benchmarks/ingest.py``). Returns ``b""``
    for no rows.
    """
    # Few distinct exchanges and symbols per batch: escape each once, then it is a dict hit.
    names: dict[str, str] = {}
    names_get = names.get
    null = NULL
    lines = [
        f"{names_get(exchange) or _escaped_into(names, exchange)}\t"
        f"{names_get(symbol) or _escaped_into(names, symbol)}\t"
        f"{timestamp}\t{local_timestamp}\t"
        f"{null if ask_amount is None else ask_amount}\t"
        f"{null if ask_price is None else ask_price}\t"
        f"{null if bid_price is None else bid_price}\t"
        f"{null if bid_amount is None else bid_amount}\n"
        for (
            exchange,
            symbol,
            timestamp,
            local_timestamp,
            ask_amount,
            ask_price,
            bid_price,
            bid_amount,
        ) in rows
    ]
    return "".join(lines).encode()


def copy_lines(data: bytes) -> list[bytes]:
    """COPY text split into its rows, each with its newline (a row never contains a raw
    newline: the encoder escapes it)."""
    return [line + b"\n" for line in data.split(b"\n")[:-1]]


def _unescape(value: str) -> str | None:
    if value == NULL:
        return None
    if "\\" not in value:
        return value
    out: list[str] = []
    i = 0
    while i < len(value):
        pair = value[i : i + 2]
        if pair in _UNESCAPES:
            out.append(_UNESCAPES[pair])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def decode_copy_line(line: bytes) -> dict[str, str | int | None]:
    """One row of :func:`encode_copy_text` back as ``{column: value}`` (timestamps as ints,
    decimals as the exact strings sent); for reports such as the writer's dead letters."""
    fields = [_unescape(value) for value in line.decode().rstrip("\n").split("\t")]
    row: dict[str, str | int | None] = dict(zip(COPY_COLUMNS, fields, strict=True))
    for column in ("timestamp", "local_timestamp"):
        value = row.get(column)
        if isinstance(value, str) and value.isdigit():
            row[column] = int(value)
    return row
