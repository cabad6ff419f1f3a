"""``resample`` over a range partly in the lake: the same buckets, to the last bit.

PostgreSQL computes the buckets of its own rows as *exact partial aggregates* (first and last
row by (timestamp, id), max and min of ``ask + bid``, the exact sum and count of spreads, the
row count); the lake's rows get the same partials on the client, from the files' unscaled
decimal integers (vectorized, exact). Buckets present in both tiers are combined exactly.
The last step, from exact values to float64, is PostgreSQL's own: the combined partials go
back in one statement that applies the very expressions of ``RESAMPLE_SQL``
(``(x / 2)::float8``, ``(sum / count)::float8`` as ``avg`` divides), so a bucket comes out
bit for bit what it was before its partition was dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from orderbook_store.models import DECIMAL_SCALE
from orderbook_store.read.lake_reader import read_lake_rows

if TYPE_CHECKING:
    import asyncpg

    from orderbook_store.files.lake_store import Lake
    from orderbook_store.read.tiers import LakeRangeEntry

__all__ = [
    "PARTIALS_SQL",
    "Partial",
    "finish",
    "lake_partials",
    "merge_partials",
    "stored_partials",
]

#: Exact per-bucket partials of PostgreSQL's rows ($1 symbol, [$2, $3), width $4, exchange $5).
PARTIALS_SQL = """
SELECT bucket,
       (array_agg(timestamp ORDER BY timestamp, id))[1] AS first_ts,
       (array_agg(id ORDER BY timestamp, id))[1] AS first_id,
       (array_agg(x ORDER BY timestamp, id))[1] AS first_x,
       (array_agg(timestamp ORDER BY timestamp DESC, id DESC))[1] AS last_ts,
       (array_agg(id ORDER BY timestamp DESC, id DESC))[1] AS last_id,
       (array_agg(x ORDER BY timestamp DESC, id DESC))[1] AS last_x,
       (array_agg(bid_price ORDER BY timestamp DESC, id DESC))[1] AS last_bid,
       (array_agg(ask_price ORDER BY timestamp DESC, id DESC))[1] AS last_ask,
       max(x) AS max_x, min(x) AS min_x,
       sum(ask_price - bid_price) AS spread_sum, count(ask_price - bid_price) AS spread_n,
       count(*) AS quotes
FROM (
    SELECT timestamp - ((timestamp % $4::bigint) + $4::bigint) % $4::bigint AS bucket,
           timestamp, id, bid_price, ask_price, ask_price + bid_price AS x
    FROM orderbook_data
    WHERE symbol = $1 AND timestamp >= $2::bigint AND timestamp < $3::bigint
      AND ($5::text IS NULL OR exchange = $5::text)
) q
GROUP BY bucket
"""

#: The partials as RESAMPLE_SQL's columns, by RESAMPLE_SQL's own expressions.
_FINISH_SQL = """
SELECT bucket,
       (first_x / 2)::float8 AS open,
       (max_x / 2)::float8 AS high,
       (min_x / 2)::float8 AS low,
       (last_x / 2)::float8 AS close,
       last_bid::float8 AS last_bid,
       last_ask::float8 AS last_ask,
       CASE WHEN spread_n = 0 THEN NULL ELSE (spread_sum / spread_n::numeric)::float8 END
           AS mean_spread,
       quotes
FROM unnest($1::int8[], $2::numeric[], $3::numeric[], $4::numeric[], $5::numeric[],
            $6::numeric[], $7::numeric[], $8::numeric[], $9::int8[], $10::int8[])
     AS t(bucket, first_x, max_x, min_x, last_x, last_bid, last_ask, spread_sum, spread_n, quotes)
ORDER BY bucket
"""

_SCALE = 10**DECIMAL_SCALE


@dataclass
class Partial:
    """One bucket's exact partial aggregate; decimals as unscaled ints (``None``: NULL)."""

    first: tuple[int, int]  # (timestamp, id)
    first_x: int | None
    last: tuple[int, int]
    last_x: int | None
    last_bid: int | None
    last_ask: int | None
    max_x: int | None
    min_x: int | None
    spread_sum: int
    spread_n: int
    quotes: int

    def merge(self, other: Partial) -> Partial:
        """The partial of both buckets' rows together."""
        first = self if self.first <= other.first else other
        last = self if self.last >= other.last else other
        return Partial(
            first.first,
            first.first_x,
            last.last,
            last.last_x,
            last.last_bid,
            last.last_ask,
            _pick(max, self.max_x, other.max_x),
            _pick(min, self.min_x, other.min_x),
            self.spread_sum + other.spread_sum,
            self.spread_n + other.spread_n,
            self.quotes + other.quotes,
        )


def _pick(how: Any, a: int | None, b: int | None) -> int | None:
    if a is None or b is None:
        return a if b is None else b
    return int(how(a, b))


def _unscaled(value: Decimal | None) -> int | None:
    return None if value is None else int(value.scaleb(DECIMAL_SCALE))


def _decimal(value: int | None) -> Decimal | None:
    """An unscaled int as a ``Decimal`` of the stored scale (so PostgreSQL sees scale 8)."""
    return None if value is None else Decimal(value).scaleb(-DECIMAL_SCALE)


def stored_partials(rows: Sequence[asyncpg.Record]) -> dict[int, Partial]:
    """``PARTIALS_SQL``'s rows by bucket."""
    return {
        int(r["bucket"]): Partial(
            (int(r["first_ts"]), int(r["first_id"])),
            _unscaled(r["first_x"]),
            (int(r["last_ts"]), int(r["last_id"])),
            _unscaled(r["last_x"]),
            _unscaled(r["last_bid"]),
            _unscaled(r["last_ask"]),
            _unscaled(r["max_x"]),
            _unscaled(r["min_x"]),
            _unscaled(r["spread_sum"]) or 0,
            int(r["spread_n"]),
            int(r["quotes"]),
        )
        for r in rows
    }


def lake_partials(
    lake: Lake,
    entries: Sequence[LakeRangeEntry],
    symbol: str,
    exchange: str | None,
    start_us: int,
    end_us: int,
    width: int,
) -> dict[int, Partial]:
    """The partials of ``symbol``'s lake rows in ``[start_us, end_us)`` (blocking)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    refs = [ref for e in entries for ref in e.files_of(symbol, exchange, start_us, end_us)]
    table = read_lake_rows(lake, refs, ["ask_price", "bid_price"], start_us, end_us)
    n = table.num_rows
    if n == 0:
        return {}
    stamps = pc.cast(table["timestamp"], pa.int64()).to_numpy()
    ids = table["id"].to_numpy()
    ask, ask_valid = _unscaled_column(table["ask_price"])
    bid, bid_valid = _unscaled_column(table["bid_price"])
    valid = ask_valid & bid_valid
    buckets = stamps - stamps % width
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
    ends = np.r_[starts[1:], n] - 1
    if ask.dtype != object and bid.dtype != object:
        widest = int((ends - starts).max()) + 1
        values = int(np.abs(ask).max()) + int(np.abs(bid).max())
        if values >= 2**62 or values * widest >= 2**62:
            ask, bid = ask.astype(object), bid.astype(object)  # exact Python ints past int64
    else:
        ask, bid = ask.astype(object), bid.astype(object)
    x = ask + bid
    spread = np.where(valid, ask - bid, 0)
    wide = x.dtype == object
    maxima = np.maximum.reduceat(np.where(valid, x, -(2**200) if wide else -(2**63)), starts)
    minima = np.minimum.reduceat(np.where(valid, x, 2**200 if wide else 2**63 - 1), starts)
    sums = np.add.reduceat(spread, starts)
    counts = np.add.reduceat(valid.astype(np.int64), starts)
    out: dict[int, Partial] = {}
    for g, (first, last) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        has = int(counts[g]) > 0
        out[int(buckets[first])] = Partial(
            (int(stamps[first]), int(ids[first])),
            int(x[first]) if valid[first] else None,
            (int(stamps[last]), int(ids[last])),
            int(x[last]) if valid[last] else None,
            int(bid[last]) if bid_valid[last] else None,
            int(ask[last]) if ask_valid[last] else None,
            int(maxima[g]) if has else None,
            int(minima[g]) if has else None,
            int(sums[g]),
            int(counts[g]),
            last - first + 1,
        )
    return out


def _unscaled_column(column: Any) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
    """A ``decimal128`` column's unscaled integers (0 where NULL) and validity."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    words = np.frombuffer(column.buffers()[1], dtype=np.int64)
    words = words[2 * column.offset : 2 * (column.offset + n)].reshape(n, 2)
    low, high = words[:, 0], words[:, 1]
    if column.null_count:
        valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    else:
        valid = np.ones(n, dtype=bool)
    if bool((high == (low >> 63)).all()):
        return np.where(valid, low, 0), valid
    values = np.empty(n, dtype=object)
    values[:] = [0 if v is None else int(v.scaleb(DECIMAL_SCALE)) for v in column.to_pylist()]
    return values, valid


def merge_partials(*tiers: dict[int, Partial]) -> list[tuple[int, Partial]]:
    """The buckets of every tier, combined, in bucket order."""
    out: dict[int, Partial] = {}
    for tier in tiers:
        for bucket, part in tier.items():
            seen = out.get(bucket)
            out[bucket] = part if seen is None else seen.merge(part)
    return sorted(out.items())


async def finish(raw: asyncpg.Connection, buckets: list[tuple[int, Partial]]) -> list[Any]:
    """RESAMPLE_SQL's rows for ``buckets``, rounded by PostgreSQL (see the module doc)."""
    parts = [p for _, p in buckets]
    return list(
        await raw.fetch(
            _FINISH_SQL,
            [b for b, _ in buckets],
            [_decimal(p.first_x) for p in parts],
            [_decimal(p.max_x) for p in parts],
            [_decimal(p.min_x) for p in parts],
            [_decimal(p.last_x) for p in parts],
            [_decimal(p.last_bid) for p in parts],
            [_decimal(p.last_ask) for p in parts],
            [_decimal(p.spread_sum) for p in parts],
            [p.spread_n for p in parts],
            [p.quotes for p in parts],
        )
    )
