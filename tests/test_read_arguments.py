"""What a read says about its arguments and the database: pandas' frequency strings, package
errors for bad arguments, a hint for a symbol stored in another case, and one clear error for
a database that was never migrated."""

from __future__ import annotations

import asyncio
import datetime as dt
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pandas.tseries.frequencies import to_offset

from orderbook_store.engine import create_engine
from orderbook_store.errors import InvalidArgument, SchemaNotMigrated, SymbolCaseWarning
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.times import parse_freq_us

T0 = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z
HOUR = 3_600_000_000


def quote(symbol: str, offset_us: int) -> dict[str, object]:
    return {
        "symbol": symbol,
        "timestamp": T0 + offset_us,
        "local_timestamp": T0 + offset_us + 7,
        "ask_amount": "1",
        "ask_price": "101",
        "bid_price": "100",
        "bid_amount": "2",
    }


# -- frequencies -------------------------------------------------------------------------------

FIXED = ["100ms", "5s", "1min", "1h", "1D", "us", "250us", "2h30min", "1.5h", "0.5s", "+1min"]


@pytest.mark.parametrize("freq", FIXED)
def test_fixed_frequencies_mean_what_they_mean_in_pandas(freq: str) -> None:
    expected_us = pd.Timedelta(to_offset(freq)).value // 1_000
    assert parse_freq_us(freq) == expected_us


def test_old_pandas_aliases_keep_their_fixed_meaning() -> None:
    assert parse_freq_us("2H") == 2 * HOUR
    assert parse_freq_us("5T") == 300_000_000
    assert parse_freq_us("10S") == 10_000_000
    assert parse_freq_us("3L") == 3_000
    assert parse_freq_us("7U") == 7
    assert parse_freq_us("5000N") == 5
    assert parse_freq_us("1d") == parse_freq_us("1D") == 24 * HOUR
    assert parse_freq_us("1MIN") == parse_freq_us("1Min") == 60_000_000


def test_durations_as_objects_are_exact_microseconds() -> None:
    assert parse_freq_us(np.timedelta64(5, "s")) == 5_000_000
    assert parse_freq_us(np.timedelta64(3, "W")) == 3 * 7 * 24 * HOUR
    assert parse_freq_us(dt.timedelta(minutes=1)) == 60_000_000
    assert parse_freq_us(pd.Timedelta("250ms")) == 250_000
    assert parse_freq_us(1_000) == 1_000
    with pytest.raises(InvalidArgument, match="microseconds"):
        parse_freq_us(pd.Timedelta("1500ns"))
    with pytest.raises(InvalidArgument, match="too wide"):
        parse_freq_us(np.timedelta64(10**17, "s"))
    with pytest.raises(InvalidArgument, match="no fixed width"):
        parse_freq_us(np.timedelta64(1, "M"))


@pytest.mark.parametrize("freq", ["1M", "M", "ME", "3MS", "1Y", "YE", "Q", "2QE", "W", "1B"])
def test_calendar_frequencies_are_refused_with_the_reason(freq: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"freq='{freq}'.*calendar"):
        parse_freq_us(freq)


def test_a_lowercase_m_is_refused_rather_than_guessed() -> None:
    with pytest.raises(InvalidArgument, match=r"freq='5m'.*'min'"):
        parse_freq_us("5m")


@pytest.mark.parametrize(
    "freq", [10**30, "1000000000000000000000000s", "100000000D", np.timedelta64(2**62 + 1, "us")]
)
def test_widths_that_overflow_are_refused(freq: object) -> None:
    with pytest.raises(InvalidArgument, match=r"freq=.*too wide"):
        parse_freq_us(freq)


@pytest.mark.parametrize("freq", ["1ns", "1500ns", "0.1us", "0s", "-1s", "1fortnight", ""])
def test_widths_that_are_not_whole_positive_microseconds_are_refused(freq: str) -> None:
    with pytest.raises(InvalidArgument, match="freq="):
        parse_freq_us(freq)


async def test_resample_refuses_a_calendar_or_overflowing_freq_before_the_database(
    repo: OrderbookRepository,
) -> None:
    await repo.add(quote("BTCUSDT", 0))
    await repo.flush()
    with pytest.raises(InvalidArgument, match="calendar"):
        await repo.resample("BTCUSDT", T0, T0 + HOUR, "1M")
    with pytest.raises(InvalidArgument, match="too wide"):
        await repo.resample("BTCUSDT", T0, T0 + HOUR, 10**30)
    bars = await repo.resample("BTCUSDT", T0, T0 + HOUR, "1D")
    assert bars["quotes"].tolist() == [1]


# -- argument errors -----------------------------------------------------------------------------


def _bad_calls() -> list[tuple[str, str, tuple[Any, ...], dict[str, Any], str]]:
    day = (T0, T0 + HOUR)
    surrogate = "binance\ud800"
    return [
        ("columns not a list", "quotes", ("BTCUSDT", *day), {"columns": 5}, "columns"),
        ("exchange surrogate", "quotes", ("BTCUSDT", *day), {"exchange": surrogate}, "exchange"),
        ("iter surrogate", "iter_quotes", ("BTCUSDT", *day), {"exchange": surrogate}, "exchange"),
        ("asof surrogate", "asof", ("BTCUSDT", T0), {"exchange": surrogate}, "exchange"),
        ("resample surrogate", "resample", ("BTCUSDT", *day), {"exchange": surrogate}, "exchange"),
        ("asof float time", "asof", ("BTCUSDT", 1.5), {}, "times"),
        ("asof no times", "asof", ("BTCUSDT", None), {}, "times"),
        ("symbol surrogate", "quotes", ("BTC\udc80", *day), {}, "symbol"),
        ("latest surrogate", "latest", (["BTC\udc80"],), {}, "symbol"),
        ("resample month", "resample", ("BTCUSDT", *day, "1M"), {}, "freq"),
        ("resample huge", "resample", ("BTCUSDT", *day, 10**30), {}, "freq"),
        ("chunk rows", "iter_quotes", ("BTCUSDT", *day), {"chunk_rows": 0}, "chunk_rows"),
    ]


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "named"),
    [case[1:] for case in _bad_calls()],
    ids=[case[0] for case in _bad_calls()],
)
async def test_bad_read_arguments_raise_invalid_argument_naming_them(
    repo: OrderbookRepository,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    named: str,
) -> None:
    with pytest.raises(InvalidArgument, match=named):
        result = getattr(repo, method)(*args, **kwargs)
        if method == "iter_quotes":
            async for _ in result:
                pass
        else:
            await result


# -- a symbol stored in another case -------------------------------------------------------------


async def test_a_read_in_the_wrong_case_warns_once_naming_the_stored_spelling(
    repo: OrderbookRepository,
) -> None:
    await repo.add_many([quote("BTCUSDT", 0), quote("BTCUSDT", 1_000), quote("ethusdt", 0)])
    await repo.flush()

    reads: dict[str, Callable[[], Any]] = {
        "quotes": lambda: repo.quotes("btcusdt", T0, T0 + HOUR),
        "asof": lambda: repo.asof("btcusdt", [T0 + 10_000]),
        "resample": lambda: repo.resample("btcusdt", T0, T0 + HOUR, "1min"),
        "latest": lambda: repo.latest(["btcusdt", "ETHUSDT"]),
    }
    for name, read in reads.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await read()
        hints = [w for w in caught if issubclass(w.category, SymbolCaseWarning)]
        assert len(hints) == 1, (name, [str(w.message) for w in caught])
        assert "'BTCUSDT'" in str(hints[0].message), name
        assert "'btcusdt'" in str(hints[0].message), name
        if name == "latest":
            assert "'ethusdt'" in str(hints[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chunks = [c async for c in repo.iter_quotes("btcusdt", T0, T0 + HOUR)]
    assert chunks == []
    assert [str(w.message).count("'BTCUSDT'") for w in caught] == [1]


async def test_no_hint_when_the_symbol_is_found_or_stored_in_no_spelling(
    repo: OrderbookRepository,
) -> None:
    await repo.add(quote("BTCUSDT", 0))
    await repo.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(await repo.quotes("BTCUSDT", T0, T0 + HOUR)) == 1
        assert len(await repo.quotes(["BTCUSDT", "nosuch"], T0, T0 + HOUR)) == 1
        # stored, but not in this range: the range is the answer, not the spelling
        assert len(await repo.quotes("BTCUSDT", T0 + HOUR, T0 + 2 * HOUR)) == 0


# -- a database that was never migrated ----------------------------------------------------------


async def test_reads_of_an_unmigrated_database_raise_one_error_naming_upgrade(
    make_database: Callable[[], str],
) -> None:
    url = await asyncio.to_thread(make_database)
    engine = create_engine(Settings(database_url=url))
    try:
        async with OrderbookRepository(engine) as repo:
            end = T0 + HOUR
            reads: list[Callable[[], Any]] = [
                lambda: repo.quotes("BTCUSDT", T0, end),
                lambda: repo.latest(),
                lambda: repo.latest("BTCUSDT"),
                lambda: repo.asof("BTCUSDT", [T0]),
                lambda: repo.asof("BTCUSDT", list(range(T0, T0 + 2_000))),
                lambda: repo.resample("BTCUSDT", T0, end, dt.timedelta(minutes=1)),
            ]
            for read in reads:
                with pytest.raises(SchemaNotMigrated, match="orderbook-store upgrade") as info:
                    await read()
                assert info.value.__cause__ is None and info.value.__suppress_context__
            with pytest.raises(SchemaNotMigrated, match="orderbook-store upgrade"):
                async for _ in repo.iter_quotes("BTCUSDT", T0, end):
                    pass
    finally:
        await engine.dispose()
