"""Lake files -> the decoded columns the PostgreSQL path produces, so the tiers merge exactly.

Only the files the catalog names for the read's symbols and dates are opened (never a listing
of the bucket). They are read as one ``pyarrow.dataset`` with the lake's hive partitioning
(``exchange`` comes from the path), filtered on ``timestamp`` so row groups outside the range
are skipped by their statistics, on pyarrow's threads (files and row groups in parallel).
This module is blocking: readers run it on a worker thread while PostgreSQL streams.

Decoding matches ``pg.copy_out``: times and ids as int64 microseconds, ``decimal128(20, 8)``
as float64 exactly ``float(Decimal(value))`` (the unscaled integer over ``10**8``, correctly
rounded while it is below 2**53, one by one through ``Decimal`` otherwise) or, with
``exact``, ``Decimal`` objects with the stored scale; NULL is NaN (``None`` when exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from orderbook_store.errors import LakeUnreadable
from orderbook_store.files.lake_format import file_schema, partitioning
from orderbook_store.models import DECIMAL_COLUMNS, DECIMAL_SCALE
from orderbook_store.pg.copy_out import DecodedColumn, TextColumn

if TYPE_CHECKING:
    from orderbook_store.files.lake_format import LakeFileRef
    from orderbook_store.files.lake_store import Lake

__all__ = ["decode_table", "read_lake_rows", "sort_order", "unreadable"]

#: Unscaled values below this convert to float64 exactly (see the module doc).
_EXACT_MANTISSA = 2**53


def _dataset(lake: Lake, refs: Sequence[LakeFileRef]) -> Any:
    import pyarrow as pa
    import pyarrow.dataset as ds

    parts = partitioning()
    schema = pa.unify_schemas([file_schema(), parts.schema])
    return ds.dataset(
        [lake.path(ref.path) for ref in refs],
        schema=schema,
        format="parquet",
        filesystem=lake.filesystem,
        partitioning=parts,
        partition_base_dir=lake.root,
    )


def read_lake_rows(
    lake: Lake,
    refs: Sequence[LakeFileRef],
    columns: Sequence[str],
    start_us: int,
    end_us: int,
) -> Any:
    """The rows of ``refs`` with ``start_us <= timestamp < end_us``: a ``pyarrow.Table`` of
    ``columns`` (file columns or ``exchange``), in (timestamp, id) order."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    wanted = list(dict.fromkeys(["timestamp", "id", *columns]))
    if not refs:
        schema = pa.unify_schemas([file_schema(), partitioning().schema])
        return schema.empty_table().select(wanted)
    stamp = pa.timestamp("us", tz="UTC")
    condition = (ds.field("timestamp") >= pa.scalar(start_us, stamp)) & (
        ds.field("timestamp") < pa.scalar(end_us, stamp)
    )
    try:
        table = _dataset(lake, refs).to_table(columns=wanted, filter=condition, use_threads=True)
    except OSError as exc:
        raise unreadable(lake, refs, exc) from exc
    order = sort_order(pc.cast(table["timestamp"], pa.int64()).to_numpy(), table["id"].to_numpy())
    return table if order is None else table.take(order)


def unreadable(lake: Lake, refs: Sequence[LakeFileRef], exc: BaseException) -> LakeUnreadable:
    """The error for lake files that could not be read (names the lake and the files)."""
    named = ", ".join(ref.path for ref in refs[:3]) + (", ..." if len(refs) > 3 else "")
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return LakeUnreadable(
        f"cannot read the lake {lake.url} (LAKE_URL): {len(refs)} file(s) that"
        f" orderbook_lake_ranges names ({named}): {reason}"
    )


def sort_order(timestamps: npt.NDArray[Any], ids: npt.NDArray[Any]) -> npt.NDArray[np.intp] | None:
    """The permutation putting rows in (timestamp, id) order, or ``None`` when they are."""
    if len(timestamps) < 2:
        return None
    later = timestamps[1:] > timestamps[:-1]
    same = timestamps[1:] == timestamps[:-1]
    if (later | (same & (ids[1:] > ids[:-1]))).all():
        return None
    return np.lexsort((ids, timestamps))


def decode_table(
    table: Any, columns: Sequence[str], exact: bool, exchange: str | None = None
) -> dict[str, DecodedColumn]:
    """``columns`` of a lake table as ``pg.copy_out`` decodes them (see the module doc)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out: dict[str, DecodedColumn] = {}
    for name in columns:
        column = table[name].combine_chunks() if table.num_rows else table[name]
        if name in ("exchange", "symbol"):
            out[name] = _text(column)
        elif name in DECIMAL_COLUMNS:
            out[name] = _decimals(column, exact)
        elif name in ("timestamp", "local_timestamp"):
            out[name] = np.asarray(pc.cast(column, pa.int64()).to_numpy(), dtype=np.int64)
        else:
            out[name] = np.asarray(column.to_numpy(), dtype=np.int64)
    return out


def _text(column: Any) -> TextColumn:
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(column) == 0:
        return TextColumn(np.zeros(0, dtype=np.int32), ())
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    codes = column.indices.to_numpy(zero_copy_only=False).astype(np.int32)
    return TextColumn(codes, tuple(str(v) for v in column.dictionary.to_pylist()))


def _decimals(column: Any, exact: bool) -> npt.NDArray[Any]:
    import pyarrow as pa

    n = len(column)
    if exact:
        out = np.empty(n, dtype=object)
        out[:] = column.to_pylist()
        return out
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    words = np.frombuffer(column.buffers()[1], dtype=np.int64)
    words = words[2 * column.offset : 2 * (column.offset + n)].reshape(n, 2)
    low, high = words[:, 0], words[:, 1]
    fits = (high == (low >> 63)) & (np.abs(low) < _EXACT_MANTISSA)
    values: npt.NDArray[np.float64] = low.astype(np.float64) / float(10**DECIMAL_SCALE)
    valid = (
        np.ones(n, dtype=bool)
        if column.null_count == 0
        else column.is_valid().to_numpy(zero_copy_only=False)
    )
    values[~valid] = np.nan
    for i in np.flatnonzero(valid & ~fits):
        value = column[int(i)].as_py()
        values[i] = float(Decimal(value))
    return values
