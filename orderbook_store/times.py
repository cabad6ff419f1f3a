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


_FREQ_UNITS_US = {
    "us": 1,
    "ms": 1_000,
    "s": 1_000_000,
    "sec": 1_000_000,
    "m": 60_000_000,
    "min": 60_000_000,
    "t": 60_000_000,
    "h": 3_600_000_000,
    "d": 86_400_000_000,
}
_FREQ_RE = re.compile(r"^\s*(\d+)?\s*([a-zA-Z]+)\s*$")


def parse_freq_us(freq: object) -> int:
    """A bucket width in microseconds from ``"1s"``, ``"5min"``, ``"1h"``, a timedelta or int µs."""
    if isinstance(freq, bool):
        raise InvalidArgument(f"freq={freq!r} is not a duration")
    if isinstance(freq, int | np.integer):
        width = int(freq)
    elif isinstance(freq, dt.timedelta):
        width = freq // _US
    elif isinstance(freq, np.timedelta64):
        width = int(freq.astype("timedelta64[us]").astype(np.int64))
    elif isinstance(freq, str):
        match = _FREQ_RE.match(freq)
        unit = _FREQ_UNITS_US.get(match.group(2).lower()) if match else None
        if match is None or unit is None:
            raise InvalidArgument(f"freq={freq!r} is not a duration like '1s', '5min', '1h'")
        width = int(match.group(1) or 1) * unit
    else:
        raise InvalidArgument(f"freq={freq!r} is not a duration")
    if width <= 0:
        raise InvalidArgument(f"freq={freq!r} must be positive")
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
