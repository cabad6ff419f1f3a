"""Parquet files, such as the hive-partitioned tree ``orderbook-store export`` writes.

A file holds ``timestamp`` and ``local_timestamp`` (``timestamp[us, UTC]``, any other time unit,
or int64 microseconds) and the four decimals (``decimal128(20, 8)`` as exported; strings or
floats are accepted too, a float taken at its shortest repr). ``exchange`` and ``symbol`` come
from the file's columns when it has them, else from the ``exchange=...``/``symbol=...``
directories above it, as hive partitioning spells them. Other columns, such as the lake
format's ``id`` and ``created_at``, are not read: imported rows get new ids. The "line" of a
rejected row is its 1-based row number in the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Final
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orderbook_store.files.importers.base import ImportOptions, Reader, RefusedFile
from orderbook_store.files.importers.rows import Checked, check
from orderbook_store.files.importers.source import Digest, ImportUnit, line_numbers
from orderbook_store.models import DECIMAL_COLUMNS

NAME: Final = "parquet"
DESCRIPTION: Final = (
    "Parquet (as `export` writes: exchange=/symbol=/date= directories, "
    "timestamp[us, UTC] times, decimal128(20,8) values)"
)

BATCH_ROWS: Final = 65_536


def hive_values(path: Path) -> dict[str, str]:
    """``key=value`` directory names above ``path`` (innermost wins), URI-decoded."""
    values: dict[str, str] = {}
    for part in reversed(path.parent.parts):
        key, sep, value = part.partition("=")
        if sep and key and key not in values:
            values[key] = unquote(value)
    return values


def _as_microseconds(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if pa.types.is_timestamp(column.type):
        return column.cast(pa.timestamp("us", tz=column.type.tz)).cast(pa.int64())
    return column.cast(pa.int64())


def _as_decimal_text(column: pa.Array) -> pa.Array:
    if pa.types.is_decimal(column.type):
        return column.cast(pa.string())
    if pa.types.is_floating(column.type):
        return pa.array(
            [None if value is None else repr(value) for value in column.to_pylist()], pa.string()
        )
    return column.cast(pa.string())


def sniff(unit: ImportUnit, options: ImportOptions) -> Reader:
    """A reader for a Parquet file; refuses one that lacks a needed column."""
    if unit.member is not None:
        raise RefusedFile(f"{unit.display}: Parquet inside a zip archive is not read; unzip it")
    schema = pq.read_schema(unit.path)
    context = {
        key: value for key, value in hive_values(unit.path).items() if key in ("exchange", "symbol")
    }
    missing = [
        name
        for name in ("timestamp", "local_timestamp", *DECIMAL_COLUMNS)
        if name not in schema.names
    ]
    if "symbol" not in schema.names and "symbol" not in context:
        missing.append("symbol (column or symbol=... directory)")
    if missing:
        raise RefusedFile(f"{unit.display}: Parquet file without {', '.join(missing)}")

    def blocks(digest: Digest | None) -> Iterator[Checked]:
        if digest is not None:  # Parquet compresses inside: its bytes are its content
            with unit.path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        parquet = pq.ParquetFile(unit.path)
        first = 1
        wanted = ("timestamp", "local_timestamp", *DECIMAL_COLUMNS, "exchange", "symbol")
        present = [name for name in wanted if name in schema.names]  # not id, created_at
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=present):
            size = batch.num_rows
            columns: dict[str, pa.Array] = {
                "line": line_numbers(first, size),
                "timestamp": _as_microseconds(batch.column("timestamp")),
                "local_timestamp": _as_microseconds(batch.column("local_timestamp")),
            }
            for name in DECIMAL_COLUMNS:
                columns[name] = _as_decimal_text(batch.column(name))
            for name in ("exchange", "symbol"):
                if name in batch.schema.names:
                    columns[name] = batch.column(name).cast(pa.string())
                elif name in context:
                    columns[name] = pa.array([context[name]] * size, pa.string())
            table = pa.table(columns)
            # "9682.00000000" from decimal128 is exact but long; trailing zeros are dropped
            # so the COPY text is as short as the original spelling.
            for name in DECIMAL_COLUMNS:
                index = table.schema.get_field_index(name)
                trimmed = pc.replace_substring_regex(table.column(name), r"\.?0+$", "")
                fixed = pc.if_else(
                    pc.match_substring(table.column(name), "."), trimmed, table.column(name)
                )
                table = table.set_column(index, name, fixed)
            first += size
            yield check(table)

    return Reader(NAME, unit, blocks, context=context)
