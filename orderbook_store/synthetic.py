"""Realistic synthetic quotes: a random walk of the mid price per symbol, for demos and tests.

Prices sit on each symbol's tick, the spread is at least one tick, timestamps are increasing
microseconds, and the collector's receive time trails the exchange's by a few milliseconds.
Values are decimal strings, as Binance sends them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

#: symbol -> (starting mid price, tick size, decimals of the tick, typical amount)
INSTRUMENTS: dict[str, tuple[float, float, int, float]] = {
    "BTCUSDT": (43_000.0, 0.1, 1, 2.0),
    "ETHUSDT": (2_300.0, 0.01, 2, 20.0),
    "SOLUSDT": (95.0, 0.001, 3, 300.0),
    "BNBUSDT": (310.0, 0.01, 2, 50.0),
    "XRPUSDT": (0.62, 0.0001, 4, 20_000.0),
}
DEFAULT_SYMBOLS: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
#: 2024-01-01T00:00:00Z in microseconds.
DEFAULT_START_US = 1_704_067_200_000_000


@dataclass
class _Walk:
    ticks: int  # mid price in ticks
    tick: float
    decimals: int
    amount: float


class QuoteWalk:
    """Endless realistic quotes for ``symbols``, round-robin in time; reproducible by ``seed``."""

    def __init__(
        self,
        symbols: Sequence[str] = DEFAULT_SYMBOLS,
        *,
        start_us: int = DEFAULT_START_US,
        step_us: int = 1_000,
        seed: int = 7,
    ) -> None:
        self.random = random.Random(seed)
        self.symbols = list(symbols)
        self.timestamp_us = start_us
        self.step_us = step_us
        self.walks: dict[str, _Walk] = {}
        for symbol in self.symbols:
            mid, tick, decimals, amount = INSTRUMENTS.get(symbol, (100.0, 0.01, 2, 10.0))
            self.walks[symbol] = _Walk(round(mid / tick), tick, decimals, amount)
        self._turn = 0

    def next_quote(self, symbol: str | None = None) -> dict[str, object]:
        """The next quote (of ``symbol``, or of the next symbol in turn) as a table-shaped dict."""
        rnd = self.random
        if symbol is None:
            symbol = self.symbols[self._turn % len(self.symbols)]
            self._turn += 1
        walk = self.walks[symbol]
        walk.ticks = max(10, walk.ticks + rnd.choice((-2, -1, -1, 0, 0, 0, 1, 1, 2)))
        spread_ticks = 1 if rnd.random() < 0.8 else rnd.randint(2, 5)
        bid_ticks = walk.ticks - spread_ticks // 2
        ask_ticks = bid_ticks + spread_ticks
        self.timestamp_us += rnd.randint(1, 2 * self.step_us)
        fmt = f"{{:.{walk.decimals}f}}"
        return {
            "exchange": "binance-futures",
            "symbol": symbol,
            "timestamp": self.timestamp_us,
            "local_timestamp": self.timestamp_us + rnd.randint(800, 25_000),
            "ask_amount": f"{rnd.expovariate(1 / walk.amount):.3f}",
            "ask_price": fmt.format(ask_ticks * walk.tick),
            "bid_price": fmt.format(bid_ticks * walk.tick),
            "bid_amount": f"{rnd.expovariate(1 / walk.amount):.3f}",
        }

    def take(self, count: int) -> list[dict[str, object]]:
        """``count`` quotes."""
        return [self.next_quote() for _ in range(count)]

    def until(self, end_us: int) -> Iterator[dict[str, object]]:
        """Quotes until the exchange time reaches ``end_us``."""
        while self.timestamp_us < end_us:
            yield self.next_quote()
