"""The SQL of the reads that are not plain ranges: latest quotes, as-of lookups, resampling."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


_QUOTE_SELECT = (
    "o.id, o.exchange, o.symbol, o.timestamp, o.local_timestamp,"
    " o.ask_amount, o.ask_price, o.bid_price, o.bid_amount"
)

#: Distinct symbols by a recursive skip scan (each step one index probe for the next greater
#: symbol), then each symbol's last quote by a backward probe.
LATEST_ALL_SQL = f"""
WITH RECURSIVE symbols AS (
    (SELECT symbol FROM orderbook_data ORDER BY symbol, timestamp LIMIT 1)
    UNION ALL
    SELECT (SELECT o.symbol FROM orderbook_data o
            WHERE o.symbol > s.symbol ORDER BY o.symbol, o.timestamp LIMIT 1)
    FROM symbols s WHERE s.symbol IS NOT NULL
)
SELECT q.* FROM symbols s CROSS JOIN LATERAL (
    SELECT {_QUOTE_SELECT} FROM orderbook_data o
    WHERE o.symbol = s.symbol
    ORDER BY o.timestamp DESC, o.id DESC LIMIT 1
) q
WHERE s.symbol IS NOT NULL
"""

LATEST_SOME_SQL = f"""
SELECT q.* FROM unnest($1::text[]) AS s(symbol) CROSS JOIN LATERAL (
    SELECT {_QUOTE_SELECT} FROM orderbook_data o
    WHERE o.symbol = s.symbol
    ORDER BY o.timestamp DESC, o.id DESC LIMIT 1
) q
"""

ASOF_SQL = f"""
SELECT t.time, q.* FROM unnest($1::bigint[]) WITH ORDINALITY AS t(time, n)
LEFT JOIN LATERAL (
    SELECT {_QUOTE_SELECT} FROM orderbook_data o
    WHERE o.symbol = $2 AND o.timestamp <= t.time
      AND ($3::text IS NULL OR o.exchange = $3::text)
    ORDER BY o.timestamp DESC, o.id DESC LIMIT 1
) q ON true
ORDER BY t.n
"""

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
