"""factory-boy factories for realistic quotes (a random walk per symbol, see ``synthetic``)."""

from __future__ import annotations

import factory

from orderbook_store.synthetic import QuoteWalk

_WALK = QuoteWalk(("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT"), seed=11)


class QuoteFactory(factory.DictFactory):
    """A table-shaped quote dict; symbols rotate, prices walk, timestamps increase (µs).

    ``QuoteFactory(symbol="ETHUSDT")`` pins the symbol; any field can be overridden.
    """

    class Params:
        book = factory.LazyAttribute(lambda o: _WALK.next_quote(o.symbol))

    exchange = "binance-futures"
    symbol = factory.Iterator(_WALK.symbols)
    timestamp = factory.LazyAttribute(lambda o: o.book["timestamp"])
    local_timestamp = factory.LazyAttribute(lambda o: o.book["local_timestamp"])
    ask_amount = factory.LazyAttribute(lambda o: o.book["ask_amount"])
    ask_price = factory.LazyAttribute(lambda o: o.book["ask_price"])
    bid_price = factory.LazyAttribute(lambda o: o.book["bid_price"])
    bid_amount = factory.LazyAttribute(lambda o: o.book["bid_amount"])
