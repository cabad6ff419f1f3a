"""The text-COPY decoder gives exactly float(Decimal(stored value)) for every value.

Values are stored in a real DECIMAL(20,8) column and read back twice: through the decoder (the
fast path of ``quotes()``) and through a plain query returning ``Decimal``; every float must
match bit for bit.
"""

from __future__ import annotations

import random
import struct
from decimal import Decimal

import numpy as np
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.pg.copy_out import (
    ColumnKind,
    CopyFormatError,
    TextCopyDecoder,
    decode_text_rows,
    unescape_copy_text,
)

T0 = 1_700_000_000_000_000


def _bits(values: np.ndarray) -> list[int]:
    return [struct.unpack("<q", struct.pack("<d", v))[0] for v in values.tolist()]


def _edge_values() -> list[str | None]:
    edges = [
        "0",
        "0.00000001",
        "-0.00000001",
        "1",
        "9682",
        "9681.92",
        "0.1",
        "0.3",
        "999999999999.99999999",
        "-999999999999.99999999",
        "90071992.54740991",  # mantissa 2**53 - 1: last exact one on the fast path
        "90071992.54740992",  # 2**53
        "90071992.54740993",  # 2**53 + 1: slow path
        "123456789012.12345678",
        "0.00000005",
        "1e-8",
        "12345678.9",
        "100000000000",
        "NaN",
        None,
    ]
    rng = random.Random(20200222)
    for _ in range(3000):
        int_digits = rng.randint(0, 12)
        frac_digits = rng.randint(0, 8)
        whole = str(rng.randrange(10**int_digits)) if int_digits else "0"
        frac = str(rng.randrange(10**frac_digits)).zfill(frac_digits) if frac_digits else ""
        sign = "-" if rng.random() < 0.1 else ""
        edges.append(f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}")
    return edges


async def _store(engine: AsyncEngine, values: list[str | None]) -> None:
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        await raw.execute(
            "INSERT INTO orderbook_data (symbol, timestamp, local_timestamp,"
            " ask_amount, ask_price, bid_price, bid_amount)"
            " SELECT 'EDGEUSDT', $2::bigint + n, $2::bigint + n, v, v, v, v"
            " FROM unnest($1::numeric[]) WITH ORDINALITY AS t(v, n)",
            values,
            T0,
        )


async def _plain(engine: AsyncEngine) -> list[Decimal | None]:
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        rows = await raw.fetch(
            "SELECT ask_price FROM orderbook_data WHERE symbol = 'EDGEUSDT' ORDER BY timestamp"
        )
    return [r[0] for r in rows]


async def test_quotes_floats_equal_float_of_decimal_bit_for_bit(engine, repo) -> None:
    values = _edge_values()
    await _store(engine, values)
    frame = await repo.quotes("EDGEUSDT", T0, T0 + 10**9, output="numpy")
    plain = await _plain(engine)
    expected = np.array([np.nan if d is None else float(d) for d in plain], dtype=np.float64)
    for column in ("ask_amount", "ask_price", "bid_price", "bid_amount"):
        got = frame[column]
        assert got.dtype == np.float64
        assert _bits(got) == _bits(expected), column


async def test_exact_gives_the_stored_decimals(engine, repo) -> None:
    values = _edge_values()[:200]
    await _store(engine, values)
    frame = await repo.quotes("EDGEUSDT", T0, T0 + 10**9, output="numpy", exact=True)
    plain = await _plain(engine)
    got = frame["bid_price"].tolist()
    assert len(got) == len(plain)
    for a, b in zip(got, plain, strict=True):
        assert (a is None and b is None) or (a.is_nan() and b.is_nan()) or a == b


def test_decoder_reads_ints_numerics_and_escaped_text_across_any_chunking() -> None:
    rows = [
        (1582329601096000, "9681.92000000", "binance-futures"),
        (-5, "-0.00000001", "a\\tb\\\\c\\nd"),
        (9223372036854775807, "\\N", "\\N"),
        (0, "NaN", "binance-futures"),
        (42, "999999999999.99999999", "x\x01y"),
    ]
    data = b"".join(f"{a}\t{b}\t{c}\n".encode() for a, b, c in rows)
    kinds = [ColumnKind.INT8, ColumnKind.NUMERIC, ColumnKind.TEXT]
    for piece in (1, 3, 7, len(data)):
        decoder = TextCopyDecoder(kinds, batch_bytes=5)
        batches = []
        for offset in range(0, len(data), piece):
            batches += decoder.feed(data[offset : offset + piece])
        batches += decoder.finish()
        ints = np.concatenate([b[0] for b in batches])
        floats = np.concatenate([b[1] for b in batches])
        texts = [t for b in batches for t in b[2].to_objects().tolist()]
        assert ints.tolist() == [r[0] for r in rows]
        assert floats[0] == 9681.92 and floats[1] == -1e-8 and np.isnan(floats[2])
        assert np.isnan(floats[3]) and floats[4] == float(Decimal("999999999999.99999999"))
        assert texts == ["binance-futures", "a\tb\\c\nd", None, "binance-futures", "x\x01y"]


def test_decoder_rejects_a_stream_cut_inside_a_row() -> None:
    decoder = TextCopyDecoder([ColumnKind.INT8, ColumnKind.INT8])
    decoder.feed(b"1\t2\n3\t")
    with pytest.raises(CopyFormatError):
        decoder.finish()
    with pytest.raises(CopyFormatError):
        decode_text_rows(b"1\t2\t3\n", [ColumnKind.INT8, ColumnKind.INT8])


def test_unescape_handles_every_copy_escape() -> None:
    assert unescape_copy_text(b"a\\b\\f\\n\\r\\t\\v\\\\z") == "a\b\f\n\r\t\v\\z"
    assert unescape_copy_text(b"\\101\\x41") == "AA"
    assert unescape_copy_text("ünï".encode()) == "ünï"
