"""Decoded columns as the frame the caller asked for: pandas, polars, Arrow or numpy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from orderbook_store.models import DECIMAL_COLUMNS
from orderbook_store.pg.copy_out import DecodedColumn, TextColumn
from orderbook_store.read.plan import _NAT, _TEXT_COLUMNS, _TIME_COLUMNS, Frame, Output

if TYPE_CHECKING:
    pass


def build_frame(columns: Mapping[str, DecodedColumn], output: Output, *, exact: bool) -> Frame:
    """Decoded columns -> the requested output type.

    Times (``timestamp``, ``local_timestamp``, ``time``, ``bucket``) become UTC microsecond
    timestamps; text columns become categoricals (pandas), strings (polars), dictionary arrays
    (Arrow) or object arrays (numpy). NULL prices are NaN (``None`` when exact).
    """
    if output == "numpy":
        return {name: _numpy_column(name, col) for name, col in columns.items()}
    if output == "pandas":
        return _pandas_frame(columns, exact)
    if output == "polars":
        return _polars_frame(columns, exact)
    return _arrow_table(columns, exact)


def _numpy_column(name: str, column: DecodedColumn) -> npt.NDArray[np.generic]:
    if isinstance(column, TextColumn):
        return column.to_objects()
    if name in _TIME_COLUMNS:
        return column.view("datetime64[us]")
    return column


def _pandas_frame(columns: Mapping[str, DecodedColumn], exact: bool) -> Frame:
    import pandas as pd

    data: dict[str, object] = {}
    for name, column in columns.items():
        if isinstance(column, TextColumn):
            data[name] = pd.Categorical.from_codes(
                column.codes, categories=pd.Index(list(column.categories), dtype=object)
            )
        elif name in _TIME_COLUMNS:
            times = pd.Series(column.view("datetime64[us]"), copy=False)
            data[name] = times.dt.tz_localize("UTC")
        else:
            data[name] = column
    return pd.DataFrame(data, copy=False)


def _polars_frame(columns: Mapping[str, DecodedColumn], exact: bool) -> Frame:
    import polars as pl

    series = []
    for name, column in columns.items():
        if isinstance(column, TextColumn):
            values = pl.Series(name, list(column.categories), dtype=pl.String)
            if (column.codes < 0).any():
                series.append(pl.Series(name, column.to_objects().tolist(), dtype=pl.String))
            else:
                series.append(values.gather(column.codes))
        elif name in _TIME_COLUMNS:
            stamps = pl.Series(name, column).cast(pl.Datetime("us", "UTC"))
            missing = column == _NAT
            if missing.any():  # as-of rows before the first quote
                stamps = stamps.scatter(np.flatnonzero(missing), None)
            series.append(stamps)
        elif column.dtype == object:
            series.append(pl.Series(name, column.tolist(), dtype=pl.Decimal(20, 8)))
        else:
            series.append(pl.Series(name, column))
    return pl.DataFrame(series)


def _arrow_table(columns: Mapping[str, DecodedColumn], exact: bool) -> Frame:
    import pyarrow as pa

    arrays = []
    for name, column in columns.items():
        if isinstance(column, TextColumn):
            codes = pa.array(column.codes, mask=column.codes < 0, type=pa.int32())
            dictionary = pa.array(list(column.categories), type=pa.string())
            arrays.append(pa.DictionaryArray.from_arrays(codes, dictionary))
        elif name in _TIME_COLUMNS:
            stamps = pa.array(column, type=pa.int64(), mask=column == _NAT)
            arrays.append(stamps.cast(pa.timestamp("us", tz="UTC")))
        elif column.dtype == object:
            arrays.append(pa.array(column.tolist(), type=pa.decimal128(20, 8)))
        else:
            arrays.append(pa.array(column))
    return pa.table(arrays, names=list(columns))


def _rows_to_columns(
    rows: Sequence[Mapping[str, object]], names: Sequence[str], exact: bool
) -> dict[str, DecodedColumn]:
    """Plain query rows (few of them: latest, asof, resample) -> decoded-column form."""
    out: dict[str, DecodedColumn] = {}
    for name in names:
        values = [row[name] for row in rows]
        if name in _TEXT_COLUMNS:
            index: dict[str, int] = {}
            codes = np.array(
                [-1 if v is None else index.setdefault(str(v), len(index)) for v in values],
                dtype=np.int32,
            )
            out[name] = TextColumn(codes, tuple(index))
        elif name in DECIMAL_COLUMNS or isinstance(next(iter(values), None), Decimal | float):
            if exact and name in DECIMAL_COLUMNS:
                out[name] = np.array(values, dtype=object)
            else:
                out[name] = np.array(
                    [np.nan if v is None else float(v) for v in values],  # type: ignore[arg-type]
                    dtype=np.float64,
                )
        else:
            if any(v is None for v in values):
                if name in _TIME_COLUMNS:
                    out[name] = np.array([_NAT if v is None else v for v in values], dtype=np.int64)
                else:
                    out[name] = np.array(
                        [np.nan if v is None else v for v in values], dtype=np.float64
                    )
            else:
                out[name] = np.array(values, dtype=np.int64)
    return out
