"""Top-of-book features for ML, vectorized, on any frame the reader returns.

Each function takes a pandas or polars DataFrame, a pyarrow Table or the ``dict`` of numpy
arrays that ``output="numpy"`` gives (float64 or ``exact=True`` Decimal columns alike) and
returns a float64 numpy array, one value per row. ``with_features`` adds all five as columns
and returns the same kind of frame. Rows with a NULL price or amount give NaN; so does a
zero denominator (no depth on either side).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from orderbook_store.read.reader import Frame

__all__ = [
    "FEATURES",
    "imbalance",
    "microprice",
    "mid",
    "spread",
    "spread_bps",
    "with_features",
]

FloatArray = npt.NDArray[np.float64]


def _column(frame: Frame, name: str) -> FloatArray:
    """One column as float64 numpy, whatever the frame type."""
    if isinstance(frame, dict):
        values = frame[name]
    elif hasattr(frame, "column") and hasattr(frame, "schema"):  # pyarrow.Table
        values = frame.column(name).to_numpy()
    else:  # pandas or polars DataFrame
        values = frame[name].to_numpy()  # type: ignore[index]
    array = np.asarray(values)
    if array.dtype == object:
        return np.array([np.nan if v is None else float(v) for v in array], dtype=np.float64)
    return array.astype(np.float64, copy=False)


def mid(frame: Frame) -> FloatArray:
    """(ask_price + bid_price) / 2."""
    return (_column(frame, "ask_price") + _column(frame, "bid_price")) / 2


def spread(frame: Frame) -> FloatArray:
    """ask_price - bid_price (negative for a crossed book)."""
    return _column(frame, "ask_price") - _column(frame, "bid_price")


def spread_bps(frame: Frame) -> FloatArray:
    """The spread in basis points of the mid price: 1e4 * spread / mid."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1e4 * spread(frame) / mid(frame)


def microprice(frame: Frame) -> FloatArray:
    """Size-weighted mid: (bid * ask_amount + ask * bid_amount) / (bid_amount + ask_amount).

    Leans toward the side with less depth, the one more likely to be taken next.
    """
    ask = _column(frame, "ask_price")
    bid = _column(frame, "bid_price")
    ask_amount = _column(frame, "ask_amount")
    bid_amount = _column(frame, "bid_amount")
    with np.errstate(divide="ignore", invalid="ignore"):
        return (bid * ask_amount + ask * bid_amount) / (bid_amount + ask_amount)


def imbalance(frame: Frame) -> FloatArray:
    """Top-of-book imbalance in [-1, 1]: (bid_amount - ask_amount) / (bid_amount + ask_amount)."""
    ask_amount = _column(frame, "ask_amount")
    bid_amount = _column(frame, "bid_amount")
    with np.errstate(divide="ignore", invalid="ignore"):
        return (bid_amount - ask_amount) / (bid_amount + ask_amount)


#: Name -> function, in the order ``with_features`` adds them.
FEATURES: dict[str, Callable[[Frame], FloatArray]] = {
    "mid": mid,
    "spread": spread,
    "spread_bps": spread_bps,
    "microprice": microprice,
    "imbalance": imbalance,
}


def with_features(frame: Frame) -> Frame:
    """``frame`` plus the columns mid, spread, spread_bps, microprice and imbalance.

    Returns a new frame of the same kind (the input is not modified).
    """
    values = {name: fn(frame) for name, fn in FEATURES.items()}
    if isinstance(frame, dict):
        return {**frame, **values}
    if hasattr(frame, "append_column") and hasattr(frame, "schema"):  # pyarrow.Table
        table = frame
        for name, array in values.items():
            table = table.append_column(name, [array])
        return table
    if hasattr(frame, "with_columns"):  # polars
        import polars as pl

        return frame.with_columns([pl.Series(n, a) for n, a in values.items()])
    return frame.assign(**values)  # type: ignore[attr-defined]
