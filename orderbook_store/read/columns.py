"""Decoded column blocks put together: concatenated, merged across symbols, re-ordered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from orderbook_store.pg.copy_out import ColumnKind, DecodedColumn, TextColumn
from orderbook_store.read.plan import _NAT, _TIME_COLUMNS, _kind, _Plan

if TYPE_CHECKING:
    pass


@dataclass
class _Block:
    """Decoded rows of one symbol (or one chunk of them), columns by name."""

    symbol: str
    nrows: int
    columns: dict[str, DecodedColumn]


def _concat(parts: list[DecodedColumn], kind: ColumnKind, exact: bool) -> DecodedColumn:
    if kind is ColumnKind.TEXT:
        texts = [p for p in parts if isinstance(p, TextColumn)]
        return _concat_text(texts)
    arrays = [p for p in parts if isinstance(p, np.ndarray)]
    if not arrays:
        dtype = np.int64 if kind is ColumnKind.INT8 else (object if exact else np.float64)
        return np.zeros(0, dtype=dtype)
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays)  # type: ignore[return-value]


def _concat_text(parts: list[TextColumn]) -> TextColumn:
    if not parts:
        return TextColumn(np.zeros(0, dtype=np.int32), ())
    if len(parts) == 1:
        return parts[0]
    categories: dict[str, int] = {}
    recoded: list[npt.NDArray[np.int32]] = []
    for part in parts:
        remap = np.empty(len(part.categories) + 1, dtype=np.int32)
        for i, value in enumerate(part.categories):
            remap[i] = categories.setdefault(value, len(categories))
        remap[-1] = -1
        recoded.append(remap[part.codes])
    return TextColumn(np.concatenate(recoded), tuple(categories))


def _block_from_batches(
    plan: _Plan, symbol: str, batches: list[list[DecodedColumn]], *, check_order: bool
) -> _Block:
    names = plan.copy_columns
    kinds = plan.kinds
    columns = {
        name: _concat([batch[i] for batch in batches], kinds[i], plan.exact)
        for i, name in enumerate(names)
    }
    timestamps = columns["timestamp"]
    nrows = len(timestamps)
    if check_order and nrows > 1:
        ids = columns["id"]
        assert isinstance(timestamps, np.ndarray) and isinstance(ids, np.ndarray)
        same_time = timestamps[1:] == timestamps[:-1]
        if (same_time & (ids[1:] < ids[:-1])).any():
            order = np.lexsort((ids, timestamps))
            columns = {name: _take(col, order) for name, col in columns.items()}
    return _Block(symbol, nrows, columns)


def _take(column: DecodedColumn, order: npt.NDArray[np.intp]) -> DecodedColumn:
    if isinstance(column, TextColumn):
        return TextColumn(column.codes[order], column.categories)
    return column[order]


def _constant_text(value: str, nrows: int) -> TextColumn:
    return TextColumn(np.zeros(nrows, dtype=np.int32), (value,) if nrows else ())


def _merge_blocks(plan: _Plan, blocks: list[_Block]) -> dict[str, DecodedColumn]:
    """The requested columns over all blocks, in block order."""
    out: dict[str, DecodedColumn] = {}
    for name in plan.columns:
        parts: list[DecodedColumn] = []
        for block in blocks:
            if name == "symbol":
                parts.append(_constant_text(block.symbol, block.nrows))
            elif name == "exchange" and plan.exchange is not None:
                parts.append(_constant_text(plan.exchange, block.nrows))
            else:
                parts.append(block.columns[name])
        out[name] = _concat(parts, _kind(name), plan.exact)
    return out


def _take_or_missing(
    column: DecodedColumn, index: npt.NDArray[np.intp], missing: npt.NDArray[np.bool_], name: str
) -> DecodedColumn:
    """``column[index]``, with rows flagged ``missing`` set to NULL (NaN, NaT, None, code -1)."""
    if isinstance(column, TextColumn):
        codes = column.codes[index] if len(column) else np.zeros(len(index), dtype=np.int32)
        codes[missing] = -1
        return TextColumn(codes, column.categories)
    if len(column) == 0:
        if column.dtype == object:
            return np.full(len(index), None, dtype=object)
        if name in _TIME_COLUMNS:
            return np.full(len(index), _NAT, dtype=np.int64)
        return np.full(len(index), np.nan, dtype=np.float64)
    taken = column[index]
    if missing.any():
        if taken.dtype == object:
            taken = np.where(missing, np.array(None, dtype=object), taken)
        elif name in _TIME_COLUMNS:
            taken[missing] = _NAT
        else:
            taken = taken.astype(np.float64)
            taken[missing] = np.nan
    return taken


def _split_block(plan: _Plan, block: _Block, nrows: int) -> tuple[_Block, _Block]:
    head: dict[str, DecodedColumn] = {}
    tail: dict[str, DecodedColumn] = {}
    for name, column in block.columns.items():
        if isinstance(column, TextColumn):
            head[name] = TextColumn(column.codes[:nrows], column.categories)
            tail[name] = TextColumn(column.codes[nrows:], column.categories)
        else:
            head[name] = column[:nrows]
            tail[name] = column[nrows:]
    return (
        _Block(block.symbol, nrows, head),
        _Block(block.symbol, block.nrows - nrows, tail),
    )
