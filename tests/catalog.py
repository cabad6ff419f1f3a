"""A comparable snapshot of a table's definition, read from the PostgreSQL catalog."""

from __future__ import annotations

import asyncpg

ORIGINAL_DDL = """
CREATE TABLE orderbook_data (
    id BIGSERIAL PRIMARY KEY,
    exchange VARCHAR(50) NOT NULL DEFAULT 'binance-futures',
    symbol VARCHAR(20) NOT NULL,
    timestamp BIGINT NOT NULL,
    local_timestamp BIGINT NOT NULL,
    ask_amount DECIMAL(20,8),
    ask_price DECIMAL(20,8),
    bid_price DECIMAL(20,8),
    bid_amount DECIMAL(20,8),
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX idx_orderbook_symbol_timestamp ON orderbook_data(symbol, timestamp);
CREATE INDEX idx_orderbook_created_at ON orderbook_data(created_at);
CREATE INDEX idx_orderbook_symbol ON orderbook_data(symbol);
"""
"""The table as DESIGN.md defines it, applied by hand (verbatim)."""


async def table_snapshot(url: str, table: str = "orderbook_data") -> dict[str, object]:
    conn = await asyncpg.connect(url)
    try:
        columns = await conn.fetch(
            """
            SELECT a.attnum, a.attname, format_type(a.atttypid, a.atttypmod) AS type,
                   a.attnotnull, pg_get_expr(d.adbin, d.adrelid) AS default
            FROM pg_attribute a
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
            ORDER BY a.attnum
            """,
            table,
        )
        constraints = await conn.fetch(
            """
            SELECT conname, contype, pg_get_constraintdef(oid) AS definition
            FROM pg_constraint WHERE conrelid = $1::regclass ORDER BY conname
            """,
            table,
        )
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = $1 ORDER BY indexname",
            table,
        )
        sequences = await conn.fetch(
            """
            SELECT s.relname, format_type(q.seqtypid, NULL) AS type
            FROM pg_class s JOIN pg_sequence q ON q.seqrelid = s.oid
            JOIN pg_depend d ON d.objid = s.oid AND d.refobjid = $1::regclass
            ORDER BY s.relname
            """,
            table,
        )
    finally:
        await conn.close()
    return {
        "columns": [tuple(r) for r in columns],
        "constraints": [tuple(r) for r in constraints],
        "indexes": [tuple(r) for r in indexes],
        "sequences": [tuple(r) for r in sequences],
    }


async def execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def fetchval(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()
