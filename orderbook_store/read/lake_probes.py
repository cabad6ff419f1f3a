"""The last lake quote of a symbol at or before a time: ``latest`` and ``asof`` across tiers.

PostgreSQL's probe answers first; the lake is asked only when a dropped range holding the
symbol ends after that answer (or there is none), so a symbol still trading costs nothing
here. The lake's files are tried newest window first (a day of the symbol, every exchange
together), each file read once per call and searched with a binary search, since its rows are
in (timestamp, id) order; the search stops at a window that ends before PostgreSQL's answer.
Blocking: readers run it on a worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import TYPE_CHECKING, Any

import numpy as np

from orderbook_store.files.lake_format import FILE_COLUMNS
from orderbook_store.models import DECIMAL_COLUMNS
from orderbook_store.read.lake_reader import unreadable

if TYPE_CHECKING:
    from orderbook_store.files.lake_format import LakeFileRef
    from orderbook_store.files.lake_store import Lake
    from orderbook_store.read.tiers import LakeRangeEntry

__all__ = ["LakeProbes", "later"]

Quote = dict[str, Any]


def later(a: Quote | None, b: Quote | None) -> Quote | None:
    """The later quote of two candidates (timestamp, then id)."""
    if a is None or b is None:
        return a if b is None else b
    return a if (a["timestamp"], a["id"]) >= (b["timestamp"], b["id"]) else b


class LakeProbes:
    """Last-quote lookups in the files of ``entries`` (one read's worth of them)."""

    def __init__(
        self, lake: Lake, entries: Sequence[LakeRangeEntry], exchange: str | None = None
    ) -> None:
        self.lake = lake
        self.entries = entries
        self.exchange = exchange
        self._loaded: dict[str, tuple[Any, Any, Any]] = {}

    def needed(self, symbol: str, upper_us: int | None, found: Quote | None) -> bool:
        """Whether the lake can hold a later answer than PostgreSQL's ``found``."""
        return any(
            symbol in e.symbols
            and (upper_us is None or e.start_us <= upper_us)
            and (found is None or e.end_us > int(found["timestamp"]))
            for e in self.entries
        )

    def last(self, symbol: str, upper_us: int | None, found: Quote | None) -> Quote | None:
        """The later of ``found`` and the lake's last quote of ``symbol`` at or before
        ``upper_us`` (``None``: of all)."""
        refs = [
            f
            for e in self.entries
            for f in e.files
            if f.symbol == symbol
            and (self.exchange is None or f.exchange == self.exchange)
            and (upper_us is None or f.low_us <= upper_us)
        ]
        refs.sort(key=lambda f: (f.high_us, f.low_us), reverse=True)
        for (high, _low), window in groupby(refs, key=lambda f: (f.high_us, f.low_us)):
            if found is not None and high <= int(found["timestamp"]):
                break  # every row of this window and older ones is earlier
            best: Quote | None = None
            for ref in window:
                best = later(best, self._last_in_file(ref, upper_us))
            if best is not None:
                return later(found, best)
        return found

    def _last_in_file(self, ref: LakeFileRef, upper_us: int | None) -> Quote | None:
        stamps, _ids, table = self._load(ref)
        index = (
            len(stamps) - 1
            if upper_us is None
            else int(np.searchsorted(stamps, upper_us, side="right") - 1)
        )
        if index < 0:
            return None
        row = table.slice(index, 1).to_pylist()[0]
        quote: Quote = {
            "id": int(row["id"]),
            "exchange": ref.exchange,
            "symbol": ref.symbol,
            "timestamp": int(stamps[index]),
            "local_timestamp": int(row["local_timestamp"]),
        }
        for name in DECIMAL_COLUMNS:
            quote[name] = row[name]
        return quote

    def _load(self, ref: LakeFileRef) -> tuple[Any, Any, Any]:
        loaded = self._loaded.get(ref.path)
        if loaded is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(
                    self.lake.path(ref.path),
                    columns=list(FILE_COLUMNS[:-1]),
                    filesystem=self.lake.filesystem,
                    partitioning=None,
                )
            except OSError as exc:
                raise unreadable(self.lake, [ref], exc) from exc
            for name in ("timestamp", "local_timestamp"):
                index = table.schema.get_field_index(name)
                table = table.set_column(index, name, table[name].cast(pa.int64()))
            loaded = (table["timestamp"].to_numpy(), table["id"].to_numpy(), table)
            self._loaded[ref.path] = loaded
        return loaded
