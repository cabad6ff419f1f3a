"""Times, days, ages and frequencies, in integer microseconds since the Unix epoch (UTC).

The one place text and objects become times: the read API's ``start``/``end``, the command
line's ``--start``/``--since``/``--older-than``, partition bounds and day names.

``start``/``end`` accept aware ``datetime`` (any zone), naive ``datetime`` (taken as UTC),
ISO-8601 strings (naive ones UTC), ``pandas.Timestamp``, ``numpy.datetime64`` (UTC) and ``int``
microseconds since the epoch. Sub-microsecond bounds round up, which keeps a half-open range
half-open on the stored microseconds.
"""

from __future__ import annotations

import datetime as dt
import re
from fractions import Fraction
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import numpy.typing as npt

from orderbook_store.errors import ConfigError, InvalidArgument

if TYPE_CHECKING:
    pass


TimeLike: TypeAlias = "dt.datetime | dt.date | str | int | np.datetime64 | np.integer[npt.NBitBase]"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_US = dt.timedelta(microseconds=1)
_INT8_MIN, _INT8_MAX = -(2**63), 2**63 - 1


def to_epoch_us(value: object, name: str = "time") -> int:
    """Microseconds since the Unix epoch (UTC) for any accepted time form; ``ValueError`` else.

    Naive ``datetime``/ISO strings/``numpy.datetime64`` are UTC. Sub-microsecond parts round up.
    """
    if isinstance(value, bool):
        raise InvalidArgument(f"{name}={value!r} is not a time")
    if isinstance(value, int | np.integer):
        micros = int(value)
    elif isinstance(value, np.datetime64):
        micros = _datetime64_us(value, name)
    elif isinstance(value, dt.datetime):
        micros = _datetime_us(value)
    elif isinstance(value, dt.date):
        micros = _datetime_us(dt.datetime(value.year, value.month, value.day))
    elif isinstance(value, str):
        micros = _parse_time_text(value, name)
    else:
        raise InvalidArgument(f"{name}={value!r} is not a time (datetime, ISO string, int µs, ...)")
    if not _INT8_MIN <= micros <= _INT8_MAX:
        raise InvalidArgument(f"{name}={value!r} is out of range")
    return micros


def _datetime_us(value: dt.datetime) -> int:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)
    micros = (aware - _EPOCH) // _US
    nanos = getattr(value, "nanosecond", 0)  # pandas.Timestamp carries nanoseconds
    return micros + 1 if nanos else micros


def _datetime64_us(value: np.datetime64, name: str) -> int:
    if np.isnat(value):
        raise InvalidArgument(f"{name}={value!r} is not a time (NaT)")
    floor = value.astype("datetime64[us]")
    micros = int(floor.astype(np.int64))
    return micros + 1 if floor < value else micros


def iso_us(text: str) -> int | None:
    """An ISO 8601 date or time (``Z`` or an offset; UTC when none) in µs, else None."""
    try:
        parsed = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return _datetime_us(parsed)


def _parse_time_text(text: str, name: str) -> int:
    stripped = text.strip()
    parsed = iso_us(stripped)
    if parsed is not None:
        return parsed
    try:
        import pandas as pd

        stamp: dt.datetime | None = pd.Timestamp(stripped)
    except (ImportError, ValueError, TypeError, OverflowError):
        stamp = None
    if not isinstance(stamp, dt.datetime) or str(stamp) == "NaT":
        raise InvalidArgument(f"{name}={text!r} is not a time (expected ISO 8601)") from None
    return _datetime_us(stamp)


# Fixed widths as pandas spells them (``to_offset``), plus the aliases pandas used before 2.2
# for the same widths (H, T, S, L, U, N), which mean nothing else. Units of more than one
# letter are matched in any case ("1MIN", "1Us"), as pandas does; "ms" is, but "MS" is
# pandas' month start, so it is a calendar unit below.
_FIXED_UNITS_NS = {
    "D": 86_400_000_000_000,
    "d": 86_400_000_000_000,
    "h": 3_600_000_000_000,
    "H": 3_600_000_000_000,
    "min": 60_000_000_000,
    "T": 60_000_000_000,
    "s": 1_000_000_000,
    "S": 1_000_000_000,
    "sec": 1_000_000_000,
    "ms": 1_000_000,
    "L": 1_000_000,
    "us": 1_000,
    "U": 1_000,
    "ns": 1,
    "N": 1,
}
# Calendar frequencies in pandas: their bins follow the calendar (month ends, weeks anchored on
# a weekday, business days), so no fixed width in microseconds can stand for them.
_CALENDAR_UNITS = {
    "M": "month end",
    "ME": "month end",
    "MS": "month start",
    "SM": "semi-month end",
    "SME": "semi-month end",
    "SMS": "semi-month start",
    "BM": "business month end",
    "BME": "business month end",
    "BMS": "business month start",
    "CBM": "custom business month end",
    "CBME": "custom business month end",
    "CBMS": "custom business month start",
    "Q": "quarter end",
    "QE": "quarter end",
    "QS": "quarter start",
    "BQ": "business quarter end",
    "BQE": "business quarter end",
    "BQS": "business quarter start",
    "Y": "year end",
    "YE": "year end",
    "YS": "year start",
    "A": "year end",
    "AS": "year start",
    "BY": "business year end",
    "BYE": "business year end",
    "BYS": "business year start",
    "BA": "business year end",
    "W": "week anchored on a weekday",
    "B": "business day",
    "C": "custom business day",
    "BH": "business hour",
    "CBH": "custom business hour",
}
_FREQ_TERM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)?([a-zA-Z]+(?:-[a-zA-Z]+)?)")
#: The widest bucket: the bucket arithmetic adds a width to a timestamp's remainder, which must
#: stay inside PostgreSQL's bigint (about 146,000 years; any real range fits in one bucket).
MAX_FREQ_US = 2**62
_FIXED_EXAMPLES = "'100ms', '5s', '1min', '1h', '1D'"


def _unit_ns(unit: str, freq: object) -> int:
    """Nanoseconds in one ``unit``, or ``InvalidArgument`` saying why it has no fixed width."""
    fixed = _FIXED_UNITS_NS.get(unit)
    if fixed is None and len(unit) > 1 and unit.upper() != "MS":
        fixed = _FIXED_UNITS_NS.get(unit.lower())
    if fixed is not None:
        return fixed
    anchor = unit.split("-", 1)[0]
    calendar = _CALENDAR_UNITS.get(anchor) or _CALENDAR_UNITS.get(anchor.upper())
    if unit == "m":
        raise InvalidArgument(
            f"freq={freq!r}: 'm' is ambiguous; write 'min' for minutes "
            "(months are a calendar frequency, which resample does not take)"
        )
    if calendar is not None:
        raise InvalidArgument(
            f"freq={freq!r} is a calendar frequency in pandas ({unit!r}: {calendar}) with no "
            f"fixed width; resample takes fixed widths like {_FIXED_EXAMPLES}"
        )
    raise InvalidArgument(f"freq={freq!r} is not a duration like {_FIXED_EXAMPLES}")


def _parse_freq_text(freq: str) -> int:
    """Microseconds in a pandas-style fixed frequency: ``"5s"``, ``"us"``, ``"1h30min"``."""
    text = freq.replace(" ", "")
    if text.startswith("+"):
        text = text[1:]
    total_ns = Fraction(0)
    position = 0
    terms = 0
    while position < len(text):
        match = _FREQ_TERM.match(text, position)
        if match is None:
            break
        number, unit = match.groups()
        total_ns += Fraction(number or "1") * _unit_ns(unit, freq)
        position = match.end()
        terms += 1
    if not terms or position != len(text):
        raise InvalidArgument(f"freq={freq!r} is not a duration like {_FIXED_EXAMPLES}")
    if total_ns % 1_000:
        raise InvalidArgument(
            f"freq={freq!r} is not a whole number of microseconds, the precision quotes are "
            "stored at"
        )
    return int(total_ns // 1_000)


_TIMEDELTA64_UNITS_FS = {
    "W": 604_800 * 10**15,
    "D": 86_400 * 10**15,
    "h": 3_600 * 10**15,
    "m": 60 * 10**15,
    "s": 10**15,
    "ms": 10**12,
    "us": 10**9,
    "ns": 10**6,
    "ps": 10**3,
    "fs": 1,
}


def _timedelta64_us(freq: np.timedelta64) -> int:
    """Exact microseconds of a ``numpy.timedelta64`` (numpy's own casts overflow silently)."""
    unit, count = np.datetime_data(freq.dtype)
    femtoseconds = _TIMEDELTA64_UNITS_FS.get(unit)
    if femtoseconds is None:
        raise InvalidArgument(f"freq={freq!r} has no fixed width in microseconds (unit {unit!r})")
    total = int(freq.astype(np.int64)) * count * femtoseconds
    if total % 10**9:
        raise InvalidArgument(f"freq={freq!r} is not a whole number of microseconds")
    return total // 10**9


def parse_freq_us(freq: object) -> int:
    """A bucket width in microseconds from a pandas fixed frequency (``"100ms"``, ``"5s"``,
    ``"1min"``, ``"1h"``, ``"1D"``, ``"us"``, ``"1h30min"``), a timedelta or int µs.

    Strings mean what they mean to pandas: ``"1M"``, ``"ME"``, ``"Y"``, ``"Q"``, ``"W"`` are
    calendar frequencies there and are refused here, as is the ambiguous ``"m"``. Raises
    ``InvalidArgument`` naming the value; a width of at most ``MAX_FREQ_US`` is accepted.
    """
    if isinstance(freq, bool):
        raise InvalidArgument(f"freq={freq!r} is not a duration")
    if isinstance(freq, np.timedelta64):  # before integers: numpy counts it as one
        if np.isnat(freq):
            raise InvalidArgument(f"freq={freq!r} is not a duration (NaT)")
        width = _timedelta64_us(freq)
    elif isinstance(freq, int | np.integer):
        width = int(freq)
    elif isinstance(freq, dt.timedelta):
        if getattr(freq, "nanoseconds", 0):  # pandas.Timedelta carries nanoseconds
            raise InvalidArgument(f"freq={freq!r} is not a whole number of microseconds")
        width = freq // _US
    elif isinstance(freq, str):
        width = _parse_freq_text(freq)
    else:
        raise InvalidArgument(f"freq={freq!r} is not a duration")
    if width <= 0:
        raise InvalidArgument(f"freq={freq!r} must be positive")
    if width > MAX_FREQ_US:
        raise InvalidArgument(
            f"freq={freq!r} is too wide: a bucket spans at most 2**62 µs (about 146,000 years)"
        )
    return width


# -- days and ages ---------------------------------------------------------------------------

US_PER_DAY = 86_400_000_000
EPOCH_DATE = dt.date(1970, 1, 1)
_AGE = re.compile(r"^\s*(\d+)\s*([dwh])\s*$")
_AGE_UNITS = {"d": "days", "w": "weeks", "h": "hours"}
_AGE_MAX = {"d": 36_500, "w": 36_500 // 7, "h": 36_500 * 24}


def day_start_us(day: dt.date) -> int:
    """Microseconds since the epoch at 00:00 UTC of ``day``."""
    return (day - EPOCH_DATE).days * US_PER_DAY


def from_us(timestamp_us: int) -> dt.datetime:
    """An aware UTC datetime for µs since the epoch."""
    return _EPOCH + dt.timedelta(microseconds=timestamp_us)


def day_of(timestamp_us: int) -> dt.date:
    """The UTC date a µs timestamp falls on."""
    return EPOCH_DATE + dt.timedelta(days=timestamp_us // US_PER_DAY)


def parse_day(value: str, option: str) -> dt.date:
    """``YYYY-MM-DD`` as a date; ``ConfigError`` naming ``option`` otherwise."""
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{option}={value!r}: write a date like 2024-01-31") from None


def parse_age(value: str, option: str) -> dt.timedelta:
    """``90d``, ``12w`` or ``36h`` (at most 100 years) as a ``timedelta``; ``ConfigError``
    naming ``option`` and the value otherwise."""
    match = _AGE.match(value)
    if match is None:
        raise ConfigError(f"{option}={value!r}: write an age like 90d, 12w or 36h")
    number = int(match.group(1))
    if number > _AGE_MAX[match.group(2)]:
        raise ConfigError(f"{option}={value!r}: at most 100 years (36500d)")
    return dt.timedelta(**{_AGE_UNITS[match.group(2)]: number})
