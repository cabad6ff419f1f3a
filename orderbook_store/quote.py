"""One incoming quote, validated: the rules every row obeys before it reaches the table.

Two layers share one set of rules:

* :func:`to_row` is the hot path. The collector calls ``repo.add()`` thousands of times a second,
  so it checks a plain mapping (or a :class:`Quote`) with type tests, integer comparisons and one
  compiled regex per decimal string, and returns a :data:`QuoteRow` tuple that the COPY encoder
  writes as is. It never builds a ``Decimal`` for the common inputs (decimal strings and floats).
* :class:`Quote` is the public, typed record (pydantic, frozen). Building one runs
  :func:`to_row`, so both layers accept and reject exactly the same values.

The rules, and the choices made where the table alone does not decide:

``exchange``
    1–50 characters, default ``'binance-futures'`` when absent or ``None``.
``symbol``
    1–20 characters. Both strings must be printable (``str.isprintable``): control characters,
    NUL, line breaks and tabs are rejected, because no exchange names a market with them and
    PostgreSQL cannot store NUL. (The COPY encoder still escapes backslash, tab, newline and CR,
    so whatever passes here is stored literally.)
``timestamp``, ``local_timestamp``
    Integers, microseconds since the Unix epoch (UTC), from 2010-01-01 up to, not including,
    2100-01-01. ``bool`` is rejected. A ``float`` with an integral value and a string of ASCII
    digits (as read from a CSV file) are accepted; other floats are rejected rather than
    truncated. A value that is in range once read as seconds, milliseconds or nanoseconds gets
    an error saying so and how to convert it.
``ask_price``, ``bid_price`` / ``ask_amount``, ``bid_amount``
    Prices > 0, amounts >= 0; finite; given as ``str``, ``float``, ``int`` or ``Decimal``;
    ``None``, a missing key or an empty string (the tardis CSV convention) mean "no value"
    (SQL NULL). The value must fit DECIMAL(20,8) *exactly*: at most 12 integer digits and at
    most 8 significant fractional digits. Nothing is ever rounded; a value that would be is
    rejected, so what is stored is what was sent. A string keeps its exact spelling
    (``"9681.92"`` stays ``"9681.92"``); a float is taken at its shortest round-trip ``repr``
    (``9681.92`` -> ``"9681.92"``), which is the number the caller wrote; a ``Decimal`` is
    written in plain, non-exponent form. A crossed quote (ask below bid) is accepted: real
    feeds carry them for an instant (a stale side, a fast market), and dropping them would
    change the record of what the exchange sent.

Every violation raises :class:`~orderbook_store.errors.InvalidQuote` naming the field, the value
and what to do; it concerns that one quote only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Final, TypeAlias

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationInfo, model_validator

from orderbook_store.errors import InvalidQuote
from orderbook_store.models import (
    QUOTE_COLUMNS,
)
from orderbook_store.quote_checks import (
    _EXCHANGE_MAX,
    _FOUR_PLAIN_DECIMALS,
    _PLAIN_DECIMAL,
    _SYMBOL_MAX,
    MAX_TIMESTAMP_US,
    MIN_TIMESTAMP_US,
    _decimal,
    _text,
    _timestamp,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DEFAULT_EXCHANGE",
    "MAX_TIMESTAMP_US",
    "MIN_TIMESTAMP_US",
    "Quote",
    "QuoteRow",
    "binance_row",
    "to_row",
]

#: A validated quote in ``models.QUOTE_COLUMNS`` order: exchange, symbol, timestamp,
#: local_timestamp, ask_amount, ask_price, bid_price, bid_amount. The four decimals are exact
#: decimal strings ready for COPY text, or ``None`` for SQL NULL.
QuoteRow: TypeAlias = tuple[str, str, int, int, str | None, str | None, str | None, str | None]

#: The table's default for ``exchange``; also what Binance USDⓈ-M futures quotes are labelled.
DEFAULT_EXCHANGE: Final = "binance-futures"


def to_row(obj: Quote | Mapping[str, object]) -> QuoteRow:
    """Validate one quote and return it as a :data:`QuoteRow`, ready for the COPY encoder.

    ``obj`` is a :class:`Quote` (returned as is, it was validated when built) or a mapping
    with the table's column names; ``exchange`` and the four decimals may be absent, other
    keys (``id``, ``created_at``, ...) are ignored. Costs about a microsecond for a typical
    dict of decimal strings or floats (see ``benchmarks/ingest.py``).

    Raises :class:`~orderbook_store.errors.InvalidQuote` naming the first field that breaks a
    rule (see the module docstring for the rules).
    """
    if type(obj) is not dict:
        if isinstance(obj, Quote):
            return obj.as_row()
        if not isinstance(obj, Mapping):
            raise InvalidQuote(
                "quote", obj, "expected a Quote or a mapping with the table's column names"
            )
    get = obj.get
    exchange = get("exchange")
    if exchange is None:
        exchange = DEFAULT_EXCHANGE
    elif (
        type(exchange) is not str
        or not 0 < len(exchange) <= _EXCHANGE_MAX
        or not exchange.isprintable()
    ):
        exchange = _text("exchange", exchange, _EXCHANGE_MAX)
    symbol = get("symbol")
    if type(symbol) is not str or not 0 < len(symbol) <= _SYMBOL_MAX or not symbol.isprintable():
        symbol = _text("symbol", symbol, _SYMBOL_MAX)
    timestamp = get("timestamp")
    if type(timestamp) is not int or not MIN_TIMESTAMP_US <= timestamp < MAX_TIMESTAMP_US:
        timestamp = _timestamp("timestamp", timestamp)
    local_timestamp = get("local_timestamp")
    if (
        type(local_timestamp) is not int
        or not MIN_TIMESTAMP_US <= local_timestamp < MAX_TIMESTAMP_US
    ):
        local_timestamp = _timestamp("local_timestamp", local_timestamp)
    ask_amount = get("ask_amount")
    ask_price = get("ask_price")
    bid_price = get("bid_price")
    bid_amount = get("bid_amount")
    # The common case, four plain decimal strings, in one regex call; prices need only
    # "not all zeros" on top.
    if (
        type(ask_amount) is str
        and type(ask_price) is str
        and type(bid_price) is str
        and type(bid_amount) is str
        and _FOUR_PLAIN_DECIMALS(f"{ask_amount}\t{ask_price}\t{bid_price}\t{bid_amount}")
        and ask_price.strip("0.")
        and bid_price.strip("0.")
    ):
        return (
            exchange,
            symbol,
            timestamp,
            local_timestamp,
            ask_amount,
            ask_price,
            bid_price,
            bid_amount,
        )
    # Otherwise field by field: a plain string is kept as is, a float whose shortest repr is
    # plain is taken as that text, everything else goes through the exact path.
    if type(ask_amount) is str and _PLAIN_DECIMAL(ask_amount):
        pass
    elif type(ask_amount) is float and _PLAIN_DECIMAL(text := repr(ask_amount)):
        ask_amount = text
    else:
        ask_amount = _decimal("ask_amount", ask_amount, False)
    if type(ask_price) is str and _PLAIN_DECIMAL(ask_price) and ask_price.strip("0."):
        pass
    elif type(ask_price) is float and ask_price > 0.0 and _PLAIN_DECIMAL(text := repr(ask_price)):
        ask_price = text
    else:
        ask_price = _decimal("ask_price", ask_price, True)
    if type(bid_price) is str and _PLAIN_DECIMAL(bid_price) and bid_price.strip("0."):
        pass
    elif type(bid_price) is float and bid_price > 0.0 and _PLAIN_DECIMAL(text := repr(bid_price)):
        bid_price = text
    else:
        bid_price = _decimal("bid_price", bid_price, True)
    if type(bid_amount) is str and _PLAIN_DECIMAL(bid_amount):
        pass
    elif type(bid_amount) is float and _PLAIN_DECIMAL(text := repr(bid_amount)):
        bid_amount = text
    else:
        bid_amount = _decimal("bid_amount", bid_amount, False)
    return (
        exchange,
        symbol,
        timestamp,
        local_timestamp,
        ask_amount,
        ask_price,
        bid_price,
        bid_amount,
    )


def _binance_fields(msg: Mapping[str, object], local_timestamp: int | None) -> dict[str, object]:
    """Map a Binance USDⓈ-M futures ``bookTicker`` message onto the table's columns."""
    data = msg.get("data")
    if isinstance(data, Mapping) and "stream" in msg:
        msg = data  # combined-stream envelope: {"stream": "...", "data": {...}}
    event = msg.get("e", "bookTicker")
    if event != "bookTicker":
        raise InvalidQuote("e", event, "is not a bookTicker message")
    event_time_ms = msg.get("E")
    if event_time_ms is None:
        raise InvalidQuote(
            "E",
            event_time_ms,
            "is missing: a USDⓈ-M futures bookTicker carries its event time in 'E' "
            "(spot bookTicker messages have none; give timestamps yourself)",
        )
    if type(event_time_ms) is not int:
        raise InvalidQuote("E", event_time_ms, "must be an integer number of milliseconds")
    if local_timestamp is None:
        local_timestamp = time.time_ns() // 1000
    return {
        "exchange": DEFAULT_EXCHANGE,
        "symbol": msg.get("s"),
        "timestamp": event_time_ms * 1000,
        "local_timestamp": local_timestamp,
        "ask_amount": msg.get("A"),
        "ask_price": msg.get("a"),
        "bid_price": msg.get("b"),
        "bid_amount": msg.get("B"),
    }


def binance_row(msg: Mapping[str, object], local_timestamp: int | None = None) -> QuoteRow:
    """A Binance futures ``bookTicker`` message straight to a validated :data:`QuoteRow`.

    The same conversion as :meth:`Quote.from_binance` without building the pydantic object,
    for collectors that want the cheapest path (``repo.add`` accepts the row's mapping form or
    a :class:`Quote`). Raises :class:`~orderbook_store.errors.InvalidQuote`.
    """
    return to_row(_binance_fields(msg, local_timestamp))


_ALL_FIELDS: Final = frozenset(QUOTE_COLUMNS)

#: Validation context meaning "these values come from to_row; do not check them twice".
_CHECKED: Final = {"orderbook_store.quote": "checked"}


def _field_values(row: QuoteRow) -> dict[str, object]:
    exchange, symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price, bid_amount = row
    return {
        "exchange": exchange,
        "symbol": symbol,
        "timestamp": timestamp,
        "local_timestamp": local_timestamp,
        "ask_amount": None if ask_amount is None else Decimal(ask_amount),
        "ask_price": None if ask_price is None else Decimal(ask_price),
        "bid_price": None if bid_price is None else Decimal(bid_price),
        "bid_amount": None if bid_amount is None else Decimal(bid_amount),
    }


class Quote(BaseModel):
    """One best bid/ask quote, validated by the same rules as :func:`to_row`.

    Fields are in table order. Decimals are exact ``Decimal`` values (never floats), times are
    integer microseconds since the Unix epoch, UTC. Frozen: a ``Quote`` is a fact, and its row
    form is computed once. Building one costs a few microseconds (pydantic); a collector on a
    tight budget can pass plain dicts to ``repo.add`` instead.

    Raises :class:`~orderbook_store.errors.InvalidQuote` for a value that breaks a rule (when
    built through pydantic's own entry points such as ``model_validate``, pydantic wraps it in
    its ``ValidationError``).
    """

    model_config = ConfigDict(frozen=True)

    exchange: str = DEFAULT_EXCHANGE
    symbol: str
    timestamp: int
    local_timestamp: int
    ask_amount: Decimal | None = None
    ask_price: Decimal | None = None
    bid_price: Decimal | None = None
    bid_amount: Decimal | None = None

    _row: QuoteRow | None = PrivateAttr(default=None)

    def __init__(self, **data: object) -> None:
        # Run the rules first so callers get InvalidQuote itself, not pydantic's wrapper, and
        # tell the model validator below that the values are already checked.
        row = to_row(data)
        self.__pydantic_validator__.validate_python(
            _field_values(row), self_instance=self, context=_CHECKED
        )
        self._row = row

    @model_validator(mode="before")
    @classmethod
    def _apply_rules(cls, data: object, info: ValidationInfo) -> object:
        """Route pydantic's own entry points (``model_validate``, nesting) through to_row."""
        if info.context is _CHECKED or isinstance(data, Quote) or not isinstance(data, Mapping):
            return data
        return _field_values(to_row(data))

    @classmethod
    def from_row(cls, row: QuoteRow) -> Self:
        """Build a ``Quote`` from a row that :func:`to_row` returned, without checking again."""
        (
            exchange,
            symbol,
            timestamp,
            local_timestamp,
            ask_amount,
            ask_price,
            bid_price,
            bid_amount,
        ) = row
        # What model_construct does, without its generic bookkeeping (it costs 2.9 µs, this
        # 0.6 µs). The instance attributes are pydantic's documented ones; a test compares the
        # result with model_validate's, field by field, including equality and hashing.
        quote = cls.__new__(cls)
        _set = object.__setattr__
        _set(
            quote,
            "__dict__",
            {
                "exchange": exchange,
                "symbol": symbol,
                "timestamp": timestamp,
                "local_timestamp": local_timestamp,
                "ask_amount": None if ask_amount is None else Decimal(ask_amount),
                "ask_price": None if ask_price is None else Decimal(ask_price),
                "bid_price": None if bid_price is None else Decimal(bid_price),
                "bid_amount": None if bid_amount is None else Decimal(bid_amount),
            },
        )
        _set(quote, "__pydantic_fields_set__", set(_ALL_FIELDS))
        _set(quote, "__pydantic_extra__", None)
        _set(quote, "__pydantic_private__", {"_row": row})
        return quote

    @classmethod
    def from_binance(cls, msg: Mapping[str, object], local_timestamp: int | None = None) -> Self:
        """A Binance USDⓈ-M futures ``bookTicker`` websocket message as a ``Quote``.

        ``E`` (event time, milliseconds) becomes ``timestamp`` in microseconds; ``s`` the
        symbol; ``b``/``B``/``a``/``A`` bid price, bid amount, ask price, ask amount (strings,
        kept exactly). ``local_timestamp`` is the receive time in microseconds; ``None`` means
        now. A combined-stream envelope (``{"stream": ..., "data": {...}}``) is unwrapped.
        The exchange is ``'binance-futures'``.
        """
        return cls.from_row(binance_row(msg, local_timestamp))

    def model_copy(self, *, update: Mapping[str, object] | None = None, deep: bool = False) -> Self:
        """A copy; with ``update``, the changed quote is checked by the rules like a new one."""
        if not update:
            return super().model_copy(deep=deep)
        fields: dict[str, object] = {name: getattr(self, name) for name in QUOTE_COLUMNS}
        fields.update(update)
        return type(self)(**fields)

    def as_row(self) -> QuoteRow:
        """The quote as a :data:`QuoteRow` (``models.QUOTE_COLUMNS`` order, decimal strings)."""
        # Straight to pydantic's private storage: ``self._row`` goes through __getattr__ and
        # costs a microsecond, as much as validating the quote.
        private = self.__pydantic_private__
        row: QuoteRow | None = private.get("_row") if private is not None else None
        if row is None:  # built by model_validate/model_construct: derive it once
            row = self._row = (
                self.exchange,
                self.symbol,
                self.timestamp,
                self.local_timestamp,
                _plain(self.ask_amount),
                _plain(self.ask_price),
                _plain(self.bid_price),
                _plain(self.bid_amount),
            )
        return row


def _plain(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


assert len(QUOTE_COLUMNS) == 8 and QUOTE_COLUMNS[4:] == (
    "ask_amount",
    "ask_price",
    "bid_price",
    "bid_amount",
), "QuoteRow's order must follow models.QUOTE_COLUMNS"
