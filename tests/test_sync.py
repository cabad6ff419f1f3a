"""``orderbook_store.sync.connect()``: the synchronous store, in a script and inside a loop."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pandas as pd
import pytest

from orderbook_store import connect
from orderbook_store.sync import OrderbookStore

T0 = 1582329600000000
DAY = 86_400_000_000


def _rows(symbol: str, n: int) -> list[dict[str, object]]:
    return [
        {
            "symbol": symbol,
            "timestamp": T0 + i * 1_000,
            "local_timestamp": T0 + i * 1_000 + 250,
            "ask_amount": "1.5",
            "ask_price": f"{9682 + i * 0.01:.2f}",
            "bid_price": f"{9681 + i * 0.01:.2f}",
            "bid_amount": "0.003",
        }
        for i in range(n)
    ]


def test_sync_store_works_in_a_plain_script(settings, engine) -> None:
    with connect(settings) as store:
        assert isinstance(store, OrderbookStore)
        assert store.insert_many(_rows("BTCUSDT", 500)) == 500
        frame = store.quotes("BTCUSDT", T0, T0 + DAY)
        assert isinstance(frame, pd.DataFrame) and len(frame) == 500
        assert frame["ask_price"].iloc[-1] == float("9686.99")
        assert store.count("BTCUSDT") == 500
        latest = store.latest()
        assert latest["symbol"].tolist() == ["BTCUSDT"]
        asof = store.asof("BTCUSDT", [T0 + 1_500])
        assert asof["bid_price"].tolist() == [9681.01]
        bars = store.resample("BTCUSDT", T0, T0 + DAY, "100ms")
        assert bars["quotes"].tolist() == [100] * 5
        chunks = list(store.iter_quotes("BTCUSDT", T0, T0 + DAY, chunk_rows=128, output="numpy"))
        assert [len(c["timestamp"]) for c in chunks] == [128, 128, 128, 116]
        assert "password" not in repr(store).lower()
        with pytest.raises(ValueError, match="excel"):
            store.quotes("BTCUSDT", T0, T0 + DAY, output="excel")
        assert len(store.quotes("NOSUCH", T0, T0 + DAY)) == 0
    with pytest.raises(RuntimeError, match="closed"):
        store.count()
    store.close()  # twice is fine


async def test_sync_store_works_inside_a_running_event_loop(settings, engine) -> None:
    # This test body runs on pytest-asyncio's loop, as a notebook cell runs on Jupyter's.
    asyncio.get_running_loop()
    store = connect(settings)
    try:
        store.insert_many(_rows("ETHUSDT", 50))
        frame = store.quotes("ETHUSDT", "2020-02-22", "2020-02-23", output="numpy")
        assert frame["timestamp"].dtype == np.dtype("datetime64[us]")
        assert len(frame["timestamp"]) == 50
        # A partly consumed iterator is closed cleanly; the loop here keeps working.
        iterator = store.iter_quotes("ETHUSDT", T0, T0 + DAY, chunk_rows=10)
        assert len(next(iterator)) == 10
        iterator.close()
        await asyncio.sleep(0)
        assert store.count() == 50
    finally:
        store.close()
    assert not any(t.name == "orderbook_store" and t.is_alive() for t in threading.enumerate())


def test_sync_store_can_be_used_from_several_threads(settings, engine) -> None:
    with connect(settings) as store:
        store.insert_many(_rows("SOLUSDT", 40))
        results: list[int] = []

        def work() -> None:
            results.append(len(store.quotes("SOLUSDT", T0, T0 + DAY)))

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [40] * 4
