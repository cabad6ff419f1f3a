"""The lake's checksum: one digest of a set of quote rows, the same from PostgreSQL and a file.

Archiving proves a lake file holds exactly the rows of the partition it came from by computing
this digest on both sides: with one aggregate on the server, and with ``pyarrow.compute`` over
the file read back. Over a set of rows it is

    sha256(canonical text) as 64 hex digits, the text being
    ``rows=<n>;id=<s>;timestamp=<s>;local_timestamp=<s>;ask_amount=<s>;ask_price=<s>;``
    ``bid_price=<s>;bid_amount=<s>``

where ``<n>`` is the number of rows and each ``<s>`` the exact sum of the column over them
(integers as plain digits; the four decimals with exactly 8 fractional digits, as
``DECIMAL(20,8)`` holds them, ``-`` in front when negative; NULL adds nothing and an empty
set sums to 0). ``timestamp`` and ``local_timestamp`` are summed as their µs integers.
Sums add up, so the digest of a partition follows from the sums of its parts (``Totals``):
one pass over a partition gives each file's digest and the whole one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from orderbook_store.models import DECIMAL_COLUMNS, DECIMAL_SCALE

__all__ = [
    "INTEGER_COLUMNS",
    "SUMMED_COLUMNS",
    "Totals",
    "checksum_sql",
    "table_totals",
    "totals_sql",
]

#: Columns summed as integers (µs for the two times).
INTEGER_COLUMNS: Final = ("id", "timestamp", "local_timestamp")
#: Every summed column, in the order of the canonical text.
SUMMED_COLUMNS: Final = (*INTEGER_COLUMNS, *DECIMAL_COLUMNS)

_QUANTUM: Final = Decimal(1).scaleb(-DECIMAL_SCALE)


def _decimal_text(value: Decimal) -> str:
    return f"{value.quantize(_QUANTUM):f}"


@dataclass(frozen=True)
class Totals:
    """The row count and exact column sums of a set of rows: what the digest is made of."""

    rows: int = 0
    id: int = 0
    timestamp: int = 0
    local_timestamp: int = 0
    ask_amount: Decimal = Decimal(0)
    ask_price: Decimal = Decimal(0)
    bid_price: Decimal = Decimal(0)
    bid_amount: Decimal = Decimal(0)

    def __add__(self, other: Totals) -> Totals:
        return Totals(
            self.rows + other.rows,
            *(getattr(self, c) + getattr(other, c) for c in SUMMED_COLUMNS),
        )

    @classmethod
    def of(cls, parts: Iterable[Totals]) -> Totals:
        """The totals of the union of ``parts`` (disjoint sets of rows)."""
        total = cls()
        for part in parts:
            total = total + part
        return total

    @classmethod
    def from_row(cls, values: Iterable[Any]) -> Totals:
        """From ``totals_sql``'s columns (count first, then the sums; NULL sums as 0)."""
        rows, *sums = list(values)
        ident, stamp, local = (int(v or 0) for v in sums[: len(INTEGER_COLUMNS)])
        ask_amount, ask_price, bid_price, bid_amount = (
            Decimal(v or 0) for v in sums[len(INTEGER_COLUMNS) :]
        )
        return cls(
            int(rows or 0), ident, stamp, local, ask_amount, ask_price, bid_price, bid_amount
        )

    def text(self) -> str:
        """The canonical text the digest hashes (see the module docstring)."""
        parts = [f"rows={self.rows}"]
        parts += [f"{c}={getattr(self, c)}" for c in INTEGER_COLUMNS]
        parts += [f"{c}={_decimal_text(getattr(self, c))}" for c in DECIMAL_COLUMNS]
        return ";".join(parts)

    def digest(self) -> str:
        """sha256 of ``text()``, 64 hex digits."""
        return hashlib.sha256(self.text().encode("ascii")).hexdigest()


def totals_sql(relation: str, where: str = "true", group_by: Iterable[str] = ()) -> str:
    """SQL: ``group_by`` columns, then ``count(*)`` and each column's exact sum over the rows of
    ``relation`` matching ``where`` (one row per group), for ``Totals.from_row``."""
    keys = list(group_by)
    sums = [f'sum("{c}")' for c in SUMMED_COLUMNS]
    select = ", ".join([*keys, "count(*)", *sums])
    grouping = f" GROUP BY {', '.join(keys)}" if keys else ""
    return f"SELECT {select} FROM {relation} WHERE {where}{grouping}"


def checksum_sql(relation: str, where: str = "true") -> str:
    """SQL of one aggregate giving ``count`` and ``checksum`` (hex) of the rows of ``relation``
    matching ``where``: the digest computed by the server alone, equal to ``Totals.digest``."""
    ints = [f"'{c}=' || coalesce(sum(\"{c}\"), 0)::text" for c in INTEGER_COLUMNS]
    decimals = [
        f"'{c}=' || round(coalesce(sum(\"{c}\"), 0), {DECIMAL_SCALE})::text"
        for c in DECIMAL_COLUMNS
    ]
    text = " || ';' || ".join(["'rows=' || count(*)::text", *ints, *decimals])
    return (
        f"SELECT count(*) AS rows, encode(sha256(convert_to({text}, 'UTF8')), 'hex') AS checksum "
        f"FROM {relation} WHERE {where}"
    )


def table_totals(table: Any) -> Totals:
    """The totals of an Arrow table holding ``FILE_COLUMNS`` (a lake file read back), computed
    with ``pyarrow.compute``: integers widened to decimal128(38, 0) so no sum overflows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wide = pa.decimal128(38, 0)
    ints: list[int] = []
    for name in INTEGER_COLUMNS:
        column = table.column(name)
        if pa.types.is_timestamp(column.type):
            column = column.cast(pa.int64())
        value = pc.sum(column.cast(wide)).as_py()
        ints.append(int(value) if value is not None else 0)
    decimals: list[Decimal] = []
    for name in DECIMAL_COLUMNS:
        value = pc.sum(table.column(name)).as_py()
        decimals.append(Decimal(value) if value is not None else Decimal(0))
    return Totals(int(table.num_rows), *ints[:3], *decimals[:4])  # type: ignore[arg-type]
