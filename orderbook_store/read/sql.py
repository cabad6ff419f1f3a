"""The SQL of resampling (latest quotes and as-of lookups are probes: see ``read.probes``)."""

from __future__ import annotations

RESAMPLE_COLUMNS: tuple[str, ...] = (
    "bucket",
    "open",
    "high",
    "low",
    "close",
    "last_bid",
    "last_ask",
    "mean_spread",
    "quotes",
)

RESAMPLE_SQL = """
SELECT bucket,
       ((array_agg(mid ORDER BY timestamp, id))[1])::float8 AS open,
       max(mid)::float8 AS high,
       min(mid)::float8 AS low,
       ((array_agg(mid ORDER BY timestamp DESC, id DESC))[1])::float8 AS close,
       ((array_agg(bid_price ORDER BY timestamp DESC, id DESC))[1])::float8 AS last_bid,
       ((array_agg(ask_price ORDER BY timestamp DESC, id DESC))[1])::float8 AS last_ask,
       avg(ask_price - bid_price)::float8 AS mean_spread,
       count(*) AS quotes
FROM (
    SELECT timestamp - ((timestamp % $4::bigint) + $4::bigint) % $4::bigint AS bucket,
           timestamp, id, bid_price, ask_price, (ask_price + bid_price) / 2 AS mid
    FROM orderbook_data
    WHERE symbol = $1 AND timestamp >= $2::bigint AND timestamp < $3::bigint
      AND ($5::text IS NULL OR exchange = $5::text)
) q
GROUP BY bucket
ORDER BY bucket
"""
