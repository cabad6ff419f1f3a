"""Delimited text lines to candidate rows, for the CSV formats (no quoting in the fast path).

tardis.dev and Binance write plain comma-separated values without quotes, so a line is split
on commas by one Arrow kernel per block. A line whose field count is off is re-read with
Python's csv module (it may be quoted after all); if that does not give the expected number of
fields either, the line is rejected with the count it has.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from orderbook_store.files.importers.rows import Checked, Rejected, check
from orderbook_store.files.importers.source import LineBlock, iter_lines, line_numbers
from orderbook_store.models import DECIMAL_COLUMNS


@dataclass(frozen=True)
class CsvLayout:
    """Where the table's columns are in a line: field positions and constants."""

    fields: int
    picks: dict[str, int]
    constants: dict[str, str] = field(default_factory=dict)
    header_lines: int = 0
    timestamp_scale: int = 1
    local_scale: int = 1


def _decode(lines: pa.Array) -> tuple[pa.Array, list[int]]:
    """Lines as UTF-8 strings; indexes of lines that are not UTF-8 (emptied here)."""
    try:
        return lines.cast(pa.string()), []
    except pa.ArrowInvalid:
        texts: list[str] = []
        broken: list[int] = []
        for index, raw in enumerate(lines.to_pylist()):
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                texts.append("")
                broken.append(index)
        return pa.array(texts, pa.string()), broken


_TIMESTAMPS = ("timestamp", "local_timestamp")
_FAST_PARSE = pacsv.ParseOptions(quote_char=False, ignore_empty_lines=False)


def _fast_candidates(block: LineBlock, layout: CsvLayout) -> pa.Table | None:
    """The whole block through Arrow's CSV parser, when every line is plain and complete.

    ``None`` when the block has anything unusual (quotes, carriage returns, a line with the
    wrong number of fields, an empty line, a timestamp that is not an integer, text that is
    not UTF-8): the line-by-line path then decides line by line.
    """
    data = block.data
    if b'"' in data or b"\r" in data:
        return None
    skip = max(0, layout.header_lines - block.first_line + 1)
    if skip >= block.count:
        return None
    names = [f"f{index}" for index in range(layout.fields)]
    wanted = sorted(set(layout.picks.values()))
    types = {
        names[index]: pa.int64() if name in _TIMESTAMPS else pa.string()
        for name, index in layout.picks.items()
    }
    try:
        table = pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip),
            parse_options=_FAST_PARSE,
            convert_options=pacsv.ConvertOptions(
                column_types=types,
                include_columns=[names[index] for index in wanted],
                strings_can_be_null=True,
                null_values=[""],
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    size = table.num_rows
    if size != block.count - skip:
        return None
    first = block.first_line + skip
    columns: dict[str, pa.Array] = {"line": line_numbers(first, size)}
    for name, index in layout.picks.items():
        columns[name] = table.column(names[index]).combine_chunks()
    for name, value in layout.constants.items():
        columns[name] = pa.array([value] * size, pa.string())
    return pa.table(columns)


def candidates(block: LineBlock, layout: CsvLayout) -> pa.Table:
    """One block of lines as candidates (see :mod:`.rows`); header and empty lines dropped."""
    fast = _fast_candidates(block, layout)
    if fast is not None:
        return fast
    text, broken = _decode(block.lines)
    size = len(text)
    numbers = line_numbers(block.first_line, size)
    keep = pc.not_equal(pc.utf8_length(text), 0)
    if broken:
        mask = [True] * size
        for index in broken:
            mask[index] = False
        keep = pc.and_(keep, pa.array(mask))
    if layout.header_lines >= block.first_line:
        keep = pc.and_(keep, pc.greater(numbers, layout.header_lines))
    parts: list[pa.Table] = []
    if broken:
        errors = [
            {"line": block.first_line + index, "text": "", "error": "is not valid UTF-8 text"}
            for index in broken
            if block.first_line + index > layout.header_lines
        ]
        if errors:
            parts.append(pa.Table.from_pylist(errors))
    text, numbers = text.filter(keep), numbers.filter(keep)
    fields = pc.split_pattern(text, ",")
    # A line with a quote is read by the csv module: its fields may hold commas or quotes.
    shaped = pc.and_(
        pc.equal(pc.list_value_length(fields), layout.fields),
        pc.invert(pc.match_substring(text, '"')),
    )
    if pc.all(shaped).as_py():
        parts.append(_pick(fields, numbers, text, layout))
    else:
        parts.append(
            _pick(fields.filter(shaped), numbers.filter(shaped), text.filter(shaped), layout)
        )
        parts.append(
            _reparse(numbers.filter(pc.invert(shaped)), text.filter(pc.invert(shaped)), layout)
        )
    table = pa.concat_tables(parts, promote_options="default")
    return table if len(parts) == 1 else table.sort_by("line")


def _pick(fields: pa.Array, numbers: pa.Array, text: pa.Array, layout: CsvLayout) -> pa.Table:
    size = len(numbers)
    columns: dict[str, pa.Array] = {"line": numbers, "text": text}
    for name, index in layout.picks.items():
        values = pc.list_element(fields, index) if size else pa.array([], pa.string())
        if name in DECIMAL_COLUMNS:
            values = pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)
        columns[name] = values
    for name, value in layout.constants.items():
        columns[name] = pa.array([value] * size, pa.string())
    return pa.table(columns)


def _reparse(numbers: pa.Array, text: pa.Array, layout: CsvLayout) -> pa.Table:
    records: list[dict[str, object]] = []
    for line, raw in zip(numbers.to_pylist(), text.to_pylist(), strict=True):
        values = next(csv.reader([raw]), [])
        record: dict[str, object] = {"line": line, "text": raw}
        if len(values) != layout.fields:
            record["error"] = f"has {len(values)} fields, expected {layout.fields}"
        else:
            for name, index in layout.picks.items():
                value = values[index]
                record[name] = None if (value == "" and name in DECIMAL_COLUMNS) else value
            record.update(layout.constants)
        records.append(record)
    schema = pa.schema(
        [("line", pa.int64()), ("text", pa.string()), ("error", pa.string())]
        + [(name, pa.string()) for name in (*layout.picks, *layout.constants)]
    )
    return pa.Table.from_pylist(records, schema=schema)


def read_csv(stream: IO[bytes], layout: CsvLayout) -> Iterator[Checked]:
    """Validated blocks of a delimited text stream laid out as ``layout``."""
    for block in iter_lines(stream):
        table = candidates(block, layout)
        checked = check(
            table, timestamp_scale=layout.timestamp_scale, local_scale=layout.local_scale
        )
        if checked.rejected and "text" not in table.column_names:
            # The fast path keeps no line text; fetch it for the few rejected lines.
            lines = block.lines
            checked.rejected = [
                Rejected(
                    entry.line,
                    entry.reason,
                    lines[entry.line - block.first_line].as_py().decode("utf-8", "replace"),
                )
                for entry in checked.rejected
            ]
        yield checked


def split_header(line: str) -> list[str]:
    """Header names, trimmed (a BOM and surrounding spaces are not part of a name)."""
    return [name.strip() for name in line.lstrip("\ufeff").split(",")]
