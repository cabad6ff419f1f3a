"""Validation of one quote: the rules every stored row obeys, through to_row and Quote."""

from __future__ import annotations

import csv
import io
import json
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from orderbook_store.errors import InvalidQuote, OrderbookStoreError
from orderbook_store.models import QUOTE_COLUMNS
from orderbook_store.quote import (
    DEFAULT_EXCHANGE,
    MAX_TIMESTAMP_US,
    MIN_TIMESTAMP_US,
    Quote,
    binance_row,
    to_row,
)

from factories import QuoteFactory

BINANCE_MESSAGE = Path(__file__).parent / "data" / "binance_futures_bookTicker_ws.json"
T0 = 1_582_329_601_096_000  # 2020-02-22T00:00:01.096Z in microseconds


def quote(**changes: object) -> dict[str, object]:
    """A valid quote dict (the first row of the real tardis file) with ``changes`` applied."""
    values: dict[str, object] = {
        "exchange": "binance-futures",
        "symbol": "BTCUSDT",
        "timestamp": T0,
        "local_timestamp": 1_582_329_603_502_092,
        "ask_amount": "0.84",
        "ask_price": "9682",
        "bid_price": "9681.92",
        "bid_amount": "0.67",
    }
    values.update(changes)
    return values


def rejected(field: str, **changes: object) -> InvalidQuote:
    with pytest.raises(InvalidQuote) as caught:
        to_row(quote(**changes))
    assert caught.value.field == field
    return caught.value


# -- the happy path --------------------------------------------------------------------


def test_row_is_in_table_column_order_with_exact_strings() -> None:
    assert to_row(quote()) == (
        "binance-futures",
        "BTCUSDT",
        T0,
        1_582_329_603_502_092,
        "0.84",
        "9682",
        "9681.92",
        "0.67",
    )
    assert len(to_row(quote())) == len(QUOTE_COLUMNS)


def test_real_tardis_file_passes_unchanged_row_for_row(real_quotes_text: str) -> None:
    reader = csv.DictReader(io.StringIO(real_quotes_text))
    assert tuple(reader.fieldnames or ()) == QUOTE_COLUMNS
    lines = real_quotes_text.splitlines()[1:]
    rows = [to_row(record) for record in reader]
    assert len(rows) == 9_999
    # Every value comes out as the file spelled it: nothing rounded, nothing reformatted.
    assert [",".join(map(str, row)) for row in rows] == lines
    assert all(type(row[2]) is int and type(row[3]) is int for row in rows)


def test_factory_quotes_are_valid() -> None:
    for _ in range(200):
        record = QuoteFactory()
        row = to_row(record)
        assert row[1] == record["symbol"]


def test_extra_keys_are_ignored_and_decimals_may_be_absent() -> None:
    record = {"id": 7, "created_at": "now", "symbol": "ETHUSDT", "timestamp": T0}
    record["local_timestamp"] = T0
    assert to_row(record) == (DEFAULT_EXCHANGE, "ETHUSDT", T0, T0, None, None, None, None)


@pytest.mark.parametrize("exchange", [None, ...])
def test_exchange_defaults_to_binance_futures(exchange: object) -> None:
    record = quote()
    if exchange is ...:
        del record["exchange"]
    else:
        record["exchange"] = exchange
    assert to_row(record)[0] == "binance-futures"


def test_a_bad_quote_costs_no_other_quote() -> None:
    records = [quote(bid_price="1"), quote(bid_price="-1"), quote(bid_price="2")]
    accepted, errors = [], []
    for record in records:
        try:
            accepted.append(to_row(record))
        except InvalidQuote as exc:
            errors.append(exc)
    assert [row[6] for row in accepted] == ["1", "2"]
    assert [exc.value for exc in errors] == ["-1"]


# -- symbol and exchange ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("X" * 21, "at most 20"),
        (None, "required"),
        (42, "string"),
        (b"BTCUSDT", "string"),
        ("BTC\tUSDT", "control"),
        ("BTC\nUSDT", "control"),
        ("BTC\rUSDT", "control"),
        ("BTC\x00USDT", "control"),
        ("BTC\x7fUSDT", "control"),
    ],
)
def test_symbol_rules(value: object, reason: str) -> None:
    error = rejected("symbol", symbol=value)
    assert reason in error.reason
    assert error.value == value


def test_symbol_limits_are_inclusive_and_printable_strings_pass() -> None:
    assert to_row(quote(symbol="X"))[1] == "X"
    assert to_row(quote(symbol="X" * 20))[1] == "X" * 20
    # Printable oddities are data, stored literally (the encoder escapes the backslash).
    assert to_row(quote(symbol="BTC\\USDT"))[1] == "BTC\\USDT"
    assert to_row(quote(symbol="\\N"))[1] == "\\N"
    assert to_row(quote(symbol="1000ŞHIBUSDT"))[1] == "1000ŞHIBUSDT"


@pytest.mark.parametrize(
    ("value", "reason"),
    [("", "empty"), ("x" * 51, "at most 50"), (3, "string"), ("bin\nance", "control")],
)
def test_exchange_rules(value: object, reason: str) -> None:
    assert reason in rejected("exchange", exchange=value).reason


def test_exchange_of_fifty_characters_passes() -> None:
    assert to_row(quote(exchange="e" * 50))[0] == "e" * 50


# -- timestamps ------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["timestamp", "local_timestamp"])
@pytest.mark.parametrize(
    ("value", "words"),
    [
        (T0 // 1000, "milliseconds"),
        (T0 // 1_000_000, "seconds"),
        (T0 * 1000, "nanoseconds"),
        (946_684_800_000_000, "2010-01-01..2100-01-01"),  # 2000-01-01 in µs
        (MIN_TIMESTAMP_US - 1, "2010-01-01..2100-01-01"),
        (MAX_TIMESTAMP_US, "2100"),
        (-T0, "2010-01-01..2100-01-01"),
        (True, "bool"),
        (float(T0) + 0.5, "whole number"),
        (float("nan"), "whole number"),
        ("1582329601096000.0", "integer"),
        ("", "integer"),
        (None, "required"),
        (Decimal(T0), "integer"),
    ],
)
def test_timestamp_rules(field: str, value: object, words: str) -> None:
    error = rejected(field, **{field: value})
    assert words in error.reason


def test_millisecond_error_says_what_to_do() -> None:
    error = rejected("timestamp", timestamp=1_582_329_601_096)
    assert "milliseconds" in str(error)
    assert "multiply by 1000" in str(error)
    assert "1582329601096" in str(error)


def test_missing_timestamp_is_rejected() -> None:
    record = quote()
    del record["local_timestamp"]
    with pytest.raises(InvalidQuote, match="required"):
        to_row(record)


@pytest.mark.parametrize(
    "value", [T0, float(T0), str(T0), np.int64(T0), MIN_TIMESTAMP_US, MAX_TIMESTAMP_US - 1]
)
def test_timestamp_forms_that_are_accepted(value: object) -> None:
    row = to_row(quote(timestamp=value))
    assert row[2] == int(value)  # type: ignore[call-overload]
    assert type(row[2]) is int


# -- prices and amounts ----------------------------------------------------------------

PRICE_FIELDS = ["ask_price", "bid_price"]
AMOUNT_FIELDS = ["ask_amount", "bid_amount"]
DECIMAL_FIELDS = PRICE_FIELDS + AMOUNT_FIELDS


@pytest.mark.parametrize("field", DECIMAL_FIELDS)
@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("9681.92", "9681.92"),
        ("25.35190000", "25.35190000"),  # Binance's spelling is kept
        ("0.00000001", "0.00000001"),
        ("999999999999.99999999", "999999999999.99999999"),
        ("1.100000000", "1.10000000"),  # nine digits, the value one decimal: the column scale
        ("1e-8", "0.00000001"),
        ("+5", "5"),
        (".5", "0.5"),
        ("000000000000001.25", "1.25"),
        (9681.92, "9681.92"),  # a float is the number its repr shows
        (0.1, "0.1"),
        (1e-05, "0.00001"),
        (np.float64(9681.92), "9681.92"),
        (9682, "9682"),
        (np.int64(9682), "9682"),
        (Decimal("9681.92"), "9681.92"),
        (Decimal("9.68192E+3"), "9681.92"),
        (Decimal("1E-8"), "0.00000001"),
        (Decimal("1E+3"), "1000"),
    ],
)
def test_decimal_forms_are_stored_exactly(field: str, value: object, stored: str) -> None:
    row = to_row(quote(**{field: value}))
    text = row[QUOTE_COLUMNS.index(field)]
    assert text == stored
    if not isinstance(value, float):
        assert Decimal(text) == Decimal(str(value))


@pytest.mark.parametrize("field", DECIMAL_FIELDS)
@pytest.mark.parametrize("value", [None, ""])
def test_absent_decimal_is_null(field: str, value: object) -> None:
    assert to_row(quote(**{field: value}))[QUOTE_COLUMNS.index(field)] is None


@pytest.mark.parametrize("field", DECIMAL_FIELDS)
@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("-1", "greater than 0|must not be negative"),
        (-0.5, "greater than 0|must not be negative"),
        (Decimal("-0.00000001"), "greater than 0|must not be negative"),
        (-3, "greater than 0|must not be negative"),
        ("NaN", "finite"),
        ("inf", "finite"),
        ("-Infinity", "finite"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (Decimal("NaN"), "finite"),
        (Decimal("sNaN"), "finite"),
        ("1000000000000", "below 10^12"),
        ("1e12", "below 10^12"),
        (10**12, "below 10^12"),
        (1e12, "below 10^12"),
        (Decimal("1E+400"), "below 10^12"),
        ("1.123456789", "more than 8 decimal places"),
        ("1e-9", "more than 8 decimal places"),
        (0.1 + 0.2, "more than 8 decimal places"),  # 0.30000000000000004
        (Decimal("1.0000000000000000000000000000001"), "more than 8 decimal places"),
        ("1e-999999999", "more than 8 decimal places"),
        (True, "bool"),
        ("1_000", "not a decimal number"),
        (" 1", "not a decimal number"),
        ("1,5", "not a decimal number"),
        ("abc", "not a decimal number"),
        ("٣", "not a decimal number"),  # a non-ASCII digit
        ([1], "got list"),
    ],
)
def test_decimal_rules(field: str, value: object, words: str) -> None:
    error = rejected(field, **{field: value})
    assert any(word in error.reason for word in words.split("|")), error.reason


@pytest.mark.parametrize("field", PRICE_FIELDS)
@pytest.mark.parametrize("value", ["0", "0.00000000", "000", 0, 0.0, -0.0, Decimal("0E-8")])
def test_price_must_be_greater_than_zero(field: str, value: object) -> None:
    assert "greater than 0" in rejected(field, **{field: value}).reason


@pytest.mark.parametrize("field", AMOUNT_FIELDS)
@pytest.mark.parametrize("value", ["0", "0.00000000", 0, 0.0, Decimal("0E-8"), "-0"])
def test_amount_may_be_zero(field: str, value: object) -> None:
    text = to_row(quote(**{field: value}))[QUOTE_COLUMNS.index(field)]
    assert text is not None and Decimal(text) == 0


def test_not_a_mapping_is_rejected() -> None:
    with pytest.raises(InvalidQuote) as caught:
        to_row(["binance-futures", "BTCUSDT"])  # type: ignore[arg-type]
    assert caught.value.field == "quote"


def test_invalid_quote_belongs_to_the_error_family_and_names_field_and_value() -> None:
    error = rejected("bid_price", bid_price="abc")
    assert isinstance(error, OrderbookStoreError)
    assert isinstance(error, ValueError)
    assert "bid_price" in str(error) and "'abc'" in str(error)


# -- Quote -----------------------------------------------------------------------------


def test_quote_holds_exact_decimals_and_gives_back_the_row() -> None:
    q = Quote(**quote())
    assert q.bid_price == Decimal("9681.92")
    assert isinstance(q.bid_price, Decimal)
    assert q.as_row() == to_row(quote())
    assert to_row(q) == q.as_row()
    assert q.symbol == "BTCUSDT" and q.exchange == "binance-futures"


def test_quote_applies_the_same_rules_and_raises_invalid_quote() -> None:
    with pytest.raises(InvalidQuote) as caught:
        Quote(**quote(timestamp=1_582_329_601_096))
    assert caught.value.field == "timestamp"
    with pytest.raises(InvalidQuote):
        Quote(**quote(bid_price=0.1 + 0.2))
    with pytest.raises(ValidationError, match="milliseconds"):
        Quote.model_validate(quote(timestamp=1_582_329_601_096))


def test_quote_from_float_prices_keeps_the_written_number() -> None:
    q = Quote(**quote(bid_price=9681.92, ask_amount=0.84))
    assert q.bid_price == Decimal("9681.92")
    assert q.as_row()[6] == "9681.92"


def test_quote_is_frozen() -> None:
    q = Quote(**quote())
    with pytest.raises(ValidationError):
        q.symbol = "ETHUSDT"  # type: ignore[misc]


def test_quote_built_by_model_validate_equals_the_constructed_one() -> None:
    a = Quote(**quote())
    b = Quote.model_validate(quote())
    assert a == b
    assert hash(a) == hash(b)
    assert a.as_row() == b.as_row()


def test_quote_copy_with_update_is_checked_and_its_row_follows() -> None:
    q = Quote(**quote())
    moved = q.model_copy(update={"symbol": "ETHUSDT", "bid_price": "2300.5"})
    assert moved.as_row()[1] == "ETHUSDT"
    assert moved.as_row()[6] == "2300.5"
    assert q.as_row()[1] == "BTCUSDT"
    with pytest.raises(InvalidQuote):
        q.model_copy(update={"bid_price": "-1"})


# -- Binance bookTicker ----------------------------------------------------------------


@pytest.fixture
def binance_message() -> dict[str, object]:
    message: dict[str, object] = json.loads(BINANCE_MESSAGE.read_text())
    return message


def test_binance_book_ticker_becomes_a_quote(binance_message: dict[str, object]) -> None:
    q = Quote.from_binance(binance_message, local_timestamp=1_568_014_460_901_234)
    assert q.exchange == "binance-futures"
    assert q.symbol == "BNBUSDT"
    assert q.timestamp == 1_568_014_460_893_000  # E (event time, ms) in µs
    assert q.local_timestamp == 1_568_014_460_901_234
    assert q.bid_price == Decimal("25.35190000")
    assert q.bid_amount == Decimal("31.21000000")
    assert q.ask_price == Decimal("25.36520000")
    assert q.ask_amount == Decimal("40.66000000")
    assert q.as_row() == (
        "binance-futures",
        "BNBUSDT",
        1_568_014_460_893_000,
        1_568_014_460_901_234,
        "40.66000000",
        "25.36520000",
        "25.35190000",
        "31.21000000",
    )
    assert binance_row(binance_message, 1_568_014_460_901_234) == q.as_row()


def test_binance_quote_equals_a_validated_one(binance_message: dict[str, object]) -> None:
    fast = Quote.from_binance(binance_message, local_timestamp=1_568_014_460_901_234)
    checked = Quote.model_validate(dict(zip(QUOTE_COLUMNS, fast.as_row())))
    assert fast == checked
    assert hash(fast) == hash(checked)
    assert fast.model_dump() == checked.model_dump()
    assert fast.model_fields_set == checked.model_fields_set
    assert repr(fast) == repr(checked)


def test_binance_local_timestamp_defaults_to_now(binance_message: dict[str, object]) -> None:
    before = time.time_ns() // 1000
    q = Quote.from_binance(binance_message)
    after = time.time_ns() // 1000
    assert before <= q.local_timestamp <= after


def test_binance_combined_stream_envelope_is_unwrapped(
    binance_message: dict[str, object],
) -> None:
    envelope = {"stream": "bnbusdt@bookTicker", "data": binance_message}
    assert Quote.from_binance(envelope, 1_568_014_460_901_234) == Quote.from_binance(
        binance_message, 1_568_014_460_901_234
    )


def test_binance_message_without_event_time_is_rejected(
    binance_message: dict[str, object],
) -> None:
    spot_style = {k: v for k, v in binance_message.items() if k not in ("E", "T", "e")}
    with pytest.raises(InvalidQuote) as caught:
        Quote.from_binance(spot_style, 1_568_014_460_901_234)
    assert caught.value.field == "E"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"e": "trade"}, "e"),
        ({"E": "1568014460893"}, "E"),
        ({"b": "-25.3519"}, "bid_price"),
        ({"s": ""}, "symbol"),
        ({"A": "NaN"}, "ask_amount"),
    ],
)
def test_bad_binance_messages_name_the_field(
    binance_message: dict[str, object], change: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidQuote) as caught:
        Quote.from_binance({**binance_message, **change}, 1_568_014_460_901_234)
    assert caught.value.field == field


def test_binance_local_timestamp_in_milliseconds_is_rejected(
    binance_message: dict[str, object],
) -> None:
    with pytest.raises(InvalidQuote, match="milliseconds") as caught:
        Quote.from_binance(binance_message, local_timestamp=1_568_014_460_901)
    assert caught.value.field == "local_timestamp"


# -- values beyond what Decimal can hold ---------------------------------------------------

BEYOND_DECIMAL = ["1e999999999999999999999", "1e-99999999999999999999", "0e9999999999999999999"]


@pytest.mark.parametrize("value", BEYOND_DECIMAL)
@pytest.mark.parametrize("field", ["ask_amount", "ask_price", "bid_price", "bid_amount"])
def test_an_exponent_beyond_decimals_range_is_an_invalid_quote(field: str, value: str) -> None:
    error = rejected(field, **{field: value})
    assert "exponent" in str(error) and value[:20] in str(error)
    with pytest.raises(InvalidQuote, match=field):
        Quote(**quote(**{field: value}))
    with pytest.raises(InvalidQuote, match=field):
        Quote.from_binance(
            {
                "e": "bookTicker",
                "E": 1582329601096,
                "s": "BTCUSDT",
                "a": "9682",
                "A": "0.84",
                "b": "9681.92",
                "B": "0.67",
                field_letter(field): value,
            },
            local_timestamp=T0,
        )


def field_letter(field: str) -> str:
    return {"ask_amount": "A", "ask_price": "a", "bid_price": "b", "bid_amount": "B"}[field]


def test_zeros_past_the_eighth_decimal_are_dropped_so_no_row_grows() -> None:
    row = to_row(quote(ask_amount="1." + "0" * 10_000, bid_price=Decimal("9681.9200000000000")))
    assert row[4] == "1.00000000"
    assert row[6] == "9681.92000000"
    assert Decimal(row[4]) == 1 and Decimal(row[6]) == Decimal("9681.92")


def test_the_largest_row_stays_within_max_row_bytes() -> None:
    from orderbook_store.pg.copy_in import MAX_ROW_BYTES, encode_copy_text

    widest = to_row(
        {
            "exchange": "\U0001f600" * 50,  # 50 characters of four UTF-8 bytes
            "symbol": "\\" * 20,  # escaped to two bytes each
            "timestamp": 4_102_444_799_999_999,
            "local_timestamp": 4_102_444_799_999_999,
            **{
                name: "999999999999.99999999" + "0" * 100
                for name in ("ask_amount", "ask_price", "bid_price", "bid_amount")
            },
        }
    )
    assert len(encode_copy_text([widest])) <= MAX_ROW_BYTES
