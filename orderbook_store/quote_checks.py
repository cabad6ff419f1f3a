"""The exact, slow-path checks behind :func:`orderbook_store.quote.to_row`: one function per kind
of field, each saying precisely what is wrong.

``to_row`` answers the common inputs (in-range integers, plain decimal strings, short
printable names) itself, in about a microsecond; anything else comes here. The rules are
stated in :mod:`orderbook_store.quote`'s docstring.
"""

from __future__ import annotations

import math
import operator
import re
from decimal import Decimal
from typing import Final, SupportsIndex, cast

from orderbook_store.errors import InvalidQuote
from orderbook_store.models import (
    DECIMAL_PRECISION,
    DECIMAL_SCALE,
    EXCHANGE_MAX_CHARS,
    SYMBOL_MAX_CHARS,
)

#: 2010-01-01T00:00:00Z in microseconds: nothing older is a real Binance futures quote.
MIN_TIMESTAMP_US: Final = 1_262_304_000_000_000
#: 2100-01-01T00:00:00Z in microseconds (exclusive).
MAX_TIMESTAMP_US: Final = 4_102_444_800_000_000

_MIN_S: Final = MIN_TIMESTAMP_US // 1_000_000
_MAX_S: Final = MAX_TIMESTAMP_US // 1_000_000

_SYMBOL_MAX: Final = SYMBOL_MAX_CHARS
_EXCHANGE_MAX: Final = EXCHANGE_MAX_CHARS
#: DECIMAL(20,8): 20 digits, 8 of them after the point, so the integer part is below 10**12.
_INTEGER_DIGITS: Final = DECIMAL_PRECISION - DECIMAL_SCALE
_INTEGER_LIMIT: Final = 10**_INTEGER_DIGITS
_SCALE: Final = DECIMAL_SCALE
_ONE_SCALED: Final = Decimal(1).scaleb(-_SCALE)

#: A plain decimal string that certainly fits DECIMAL(20,8) and needs no rewriting. Anything
#: else (exponents, signs, leading dot, more digits) takes the slower exact path.
_PLAIN = r"[0-9]{1,12}(?:\.[0-9]{1,8})?"
_PLAIN_DECIMAL = re.compile(_PLAIN).fullmatch
#: The four decimals of a quote, tab-joined, all plain (a tab cannot occur inside a match).
_FOUR_PLAIN_DECIMALS = re.compile(rf"{_PLAIN}\t{_PLAIN}\t{_PLAIN}\t{_PLAIN}").fullmatch

#: What ``Decimal`` accepts minus its extras (underscores, surrounding spaces, NaN/Infinity).
_DECIMAL_SYNTAX = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?").fullmatch
_NON_FINITE: Final = frozenset({"nan", "snan", "inf", "infinity"})


def _text(field: str, value: object, limit: int) -> str:
    """The slow path for ``exchange``/``symbol``: accept str subclasses, explain failures."""
    if not isinstance(value, str):
        if value is None:
            raise InvalidQuote(field, value, "is required")
        raise InvalidQuote(field, value, f"must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidQuote(field, value, "must not be empty")
    if len(value) > limit:
        raise InvalidQuote(
            field, value, f"is {len(value)} characters long; the column holds at most {limit}"
        )
    if not value.isprintable():
        raise InvalidQuote(
            field, value, "contains a control or non-printable character (tab, newline, NUL, ...)"
        )
    return str(value)


def _timestamp(field: str, value: object) -> int:
    """The slow path for a timestamp that is not already an in-range ``int``."""
    if isinstance(value, bool):
        raise InvalidQuote(field, value, "must be an integer number of microseconds, not a bool")
    if isinstance(value, int):
        number = int(value)
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise InvalidQuote(
                field, value, "must be a whole number of microseconds since the Unix epoch"
            )
        number = int(value)
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    elif value is None:
        raise InvalidQuote(field, value, "is required (microseconds since the Unix epoch, UTC)")
    elif hasattr(type(value), "__index__"):  # numpy integers and the like
        number = operator.index(cast(SupportsIndex, value))
    else:
        raise InvalidQuote(
            field,
            value,
            f"must be an integer number of microseconds since the Unix epoch, "
            f"got {type(value).__name__}",
        )
    if MIN_TIMESTAMP_US <= number < MAX_TIMESTAMP_US:
        return number
    if _MIN_S <= number < _MAX_S:
        hint = "looks like seconds; multiply by 1,000,000 to get microseconds"
    elif _MIN_S * 1000 <= number < _MAX_S * 1000:
        hint = "looks like milliseconds (Binance E/T fields); multiply by 1000 to get microseconds"
    elif MIN_TIMESTAMP_US * 1000 <= number < MAX_TIMESTAMP_US * 1000:
        hint = "looks like nanoseconds; integer-divide by 1000 to get microseconds"
    else:
        hint = "is outside 2010-01-01..2100-01-01 in microseconds since the Unix epoch"
    raise InvalidQuote(field, value, hint)


def _sign_error(field: str, value: object, positive: bool) -> InvalidQuote:
    return InvalidQuote(
        field,
        value,
        "a price must be greater than 0" if positive else "an amount must not be negative",
    )


def _parse_decimal(field: str, text: str) -> Decimal:
    """``Decimal(text)`` for text already known to be decimal syntax; an exponent beyond what
    ``Decimal`` can represent (``1e999999999999999999999``) is an ``InvalidQuote``."""
    try:
        return Decimal(text)
    except ArithmeticError:
        raise InvalidQuote(
            field, text, "does not fit DECIMAL(20,8): its exponent is out of range"
        ) from None


def _from_decimal(field: str, value: object, number: Decimal, positive: bool) -> str:
    """Exact check of any ``Decimal`` against DECIMAL(20,8); plain notation out, never rounded.

    Out comes at most 21 characters (12 integer digits, the point, 8 decimals): zeros beyond
    the 8th decimal, which the column would drop anyway, are dropped here, so no row grows
    past ``pg.copy_in.MAX_ROW_BYTES`` however its value was spelled.
    """
    try:
        return _checked_plain(field, value, number, positive)
    except ArithmeticError:  # an exponent at the very edge of Decimal's range
        raise InvalidQuote(field, value, "does not fit DECIMAL(20,8)") from None


def _checked_plain(field: str, value: object, number: Decimal, positive: bool) -> str:
    if not number.is_finite():
        raise InvalidQuote(field, value, "must be a finite number (no NaN or infinity)")
    if not number:
        if positive:
            raise _sign_error(field, value, positive)
        return "0"
    if number.is_signed():
        raise _sign_error(field, value, positive)
    if number.adjusted() >= _INTEGER_DIGITS:
        raise InvalidQuote(
            field, value, "does not fit DECIMAL(20,8): the integer part must be below 10^12"
        )
    # Count decimals of the exact value (trailing zeros do not count). No normalize(): it
    # rounds to the context's 28 digits, which is exactly the surprise this avoids.
    _, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)
    trailing_zeros = len(digits) - len("".join(map(str, digits)).rstrip("0"))
    if exponent + trailing_zeros < -_SCALE:
        raise InvalidQuote(
            field,
            value,
            "has more than 8 decimal places; DECIMAL(20,8) would round it. "
            "Round it yourself, or pass a string with at most 8 decimals",
        )
    if exponent < -_SCALE:
        number = number.quantize(_ONE_SCALED)  # exact: only zeros go (checked just above)
    return format(number, "f")


def _decimal(field: str, value: object, positive: bool) -> str | None:
    """The exact path for a decimal that is not an already-plain, in-range string."""
    if isinstance(value, str):
        if not value:
            return None  # an empty CSV cell: no value, as in tardis files
        if _PLAIN_DECIMAL(value):
            # Plain and in range; the fast path only sends it here for a zero price.
            if positive and not value.strip("0."):
                raise _sign_error(field, value, positive)
            return str(value)
        if not _DECIMAL_SYNTAX(value):
            if value.strip().lower().lstrip("+-") in _NON_FINITE:
                raise InvalidQuote(field, value, "must be a finite number (no NaN or infinity)")
            raise InvalidQuote(field, value, "is not a decimal number such as '9681.92'")
        return _from_decimal(field, value, _parse_decimal(field, value), positive)
    if isinstance(value, float):  # includes numpy.float64
        text = repr(float(value))  # shortest round-trip: the number the caller wrote
        if _PLAIN_DECIMAL(text):
            if positive and not value:
                raise _sign_error(field, value, positive)
            return text
        if not math.isfinite(value):
            raise InvalidQuote(field, value, "must be a finite number (no NaN or infinity)")
        return _from_decimal(field, value, _parse_decimal(field, text), positive)
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidQuote(field, value, "must be a number, not a bool")
    if isinstance(value, Decimal):
        return _from_decimal(field, value, value, positive)
    if isinstance(value, int) or hasattr(type(value), "__index__"):
        number = operator.index(cast(SupportsIndex, value))
        if number < 0 or (positive and number == 0):
            raise _sign_error(field, value, positive)
        if number >= _INTEGER_LIMIT:
            raise InvalidQuote(
                field, value, "does not fit DECIMAL(20,8): the integer part must be below 10^12"
            )
        return str(number)
    raise InvalidQuote(
        field,
        value,
        f"must be a decimal string, float, int or Decimal, got {type(value).__name__}",
    )
