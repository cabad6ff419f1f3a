"""Last-quote probes: each symbol's last quote, or the last one at or before a time.

These answer ``latest``, ``asof`` (few times) and the quote in force at a time. On a plain
table each probe is one backward descent of ``idx_orderbook_symbol_timestamp``. On a
partitioned table the probes walk the partitions newest first (see ``read.layout``): a probe
asks the partition that can hold its time (for the last quote of all: the current partition and
those made ahead of time, then the newest one before them alone), then windows of older
partitions, doubling in size, until a partition has a row for it; the default partition is
asked once, and its candidate wins when it is later. Each round is one statement naming only
the partitions it asks, so the server plans a handful of small tables instead of every
partition, and a probe usually costs one descent, as on a plain table.

``latest()`` of every stored symbol first needs the symbols. A partitioned table keeps their
list (``orderbook_symbols``, revision 0006), so each listed symbol is probed as above, newest
partitions first: one statement for the list, then a round or two of probes (a symbol listed
but no longer stored walks every partition and yields nothing; ``prune`` takes such symbols
off the list, see ``ops.symbols``). A
plain table, or a partitioned one from before 0006, finds them with a skip scan of each part
(one descent per distinct symbol, plus one), all in one statement, which also says which
partition is the newest to hold each symbol; then one probe each, into that partition. That
costs ``partitions x (symbols + 1)`` descents: one per symbol on a plain table, but about
150-230 ms for 365 daily partitions of 20 symbols.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orderbook_store.read.layout import SYMBOLS, Layout

if TYPE_CHECKING:
    import asyncpg

__all__ = ["Probe", "last_quotes", "latest_of_every_symbol"]

#: The columns a probe returns (a quote and its id).
QUOTE_SELECT = (
    "o.id, o.exchange, o.symbol, o.timestamp, o.local_timestamp,"
    " o.ask_amount, o.ask_price, o.bid_price, o.bid_amount"
)

#: "No upper bound" as a bigint, so every probe has the same shape.
_NO_UPPER = 2**63 - 1

#: Default partition's index in a round's assignments.
_DEFAULT = -1


@dataclass(frozen=True)
class Probe:
    """The last quote of ``symbol`` (greatest timestamp, then id) at or before ``upper_us``
    (``None``: the last one of all)."""

    symbol: str
    upper_us: int | None = None


@dataclass
class _Walk:
    """Where one probe's walk over the ranged partitions stands."""

    symbol: str
    upper_us: int
    cursor: int  # the next ranged part to ask
    window: int  # how many parts to ask next round
    found: asyncpg.Record | None = None
    best_part: int = 1 << 30
    default: asyncpg.Record | None = None
    done: bool = field(default=False)


async def last_quotes(
    raw: asyncpg.Connection,
    layout: Layout,
    probes: Sequence[Probe],
    *,
    exchange: str | None = None,
) -> list[asyncpg.Record | None]:
    """One row (``QUOTE_SELECT``'s columns) or ``None`` per probe, in the probes' order.

    ``exchange`` keeps only that exchange's quotes. Equal probes are asked once.
    """
    unique = list(dict.fromkeys(probes))
    now_us = int(time.time() * 1_000_000)
    walks = [_start(layout, probe, now_us) for probe in unique]
    first_round = True
    while True:
        assignments: dict[int, list[int]] = {}
        for number, walk in enumerate(walks):
            if walk.done:
                continue
            stop = min(walk.cursor + walk.window, len(layout.ranged))
            for index in range(walk.cursor, stop):
                assignments.setdefault(index, []).append(number)
        if first_round and layout.default is not None and walks:
            assignments[_DEFAULT] = list(range(len(walks)))
        if not assignments:
            break
        for row in await _ask(raw, layout, assignments, walks, exchange):
            walk = walks[row["probe"]]
            if row["part"] == _DEFAULT:
                walk.default = row
            elif row["part"] < walk.best_part:
                walk.found, walk.best_part = row, row["part"]
        for walk in walks:
            if walk.done:
                continue
            walk.cursor += walk.window
            # After the current and the ahead partitions (usually empty), the newest closed one
            # alone: a symbol still trading is there, so every symbol costs one descent.
            walk.window = 1 if first_round and walk.upper_us == _NO_UPPER else walk.window * 2
            walk.done = walk.found is not None or walk.cursor >= len(layout.ranged)
        first_round = False
    answers = dict(zip(unique, (_later(w.found, w.default) for w in walks), strict=True))
    return [answers[probe] for probe in probes]


async def latest_of_every_symbol(raw: asyncpg.Connection, layout: Layout) -> list[asyncpg.Record]:
    """The last quote of every stored symbol (in no particular order).

    Listed symbols (see the module doc) are probed newest partition first. Otherwise one
    statement finds the symbols and the newest partition holding each; a second probes each
    symbol there (and in the default partition, where it has rows).
    """
    if layout.symbols_listed:
        listed = await raw.fetch(f"SELECT symbol FROM {SYMBOLS}")
        last = await last_quotes(raw, layout, [Probe(r["symbol"]) for r in listed])
        return [row for row in last if row is not None]
    found = await raw.fetch(_symbols_sql(layout))
    walks: list[_Walk] = []
    assignments: dict[int, list[int]] = {}
    for row in found:
        newest = row["newest"]
        walk = _Walk(row["symbol"], _NO_UPPER, cursor=0, window=0, done=True)
        walks.append(walk)
        if newest is not None:
            assignments.setdefault(int(newest), []).append(len(walks) - 1)
        if row["in_default"]:
            assignments.setdefault(_DEFAULT, []).append(len(walks) - 1)
    if not assignments:
        return []
    for row in await _ask(raw, layout, assignments, walks, None):
        walk = walks[row["probe"]]
        if row["part"] == _DEFAULT:
            walk.default = row
        else:
            walk.found = row
    return [r for r in (_later(w.found, w.default) for w in walks) if r is not None]


def _start(layout: Layout, probe: Probe, now_us: int) -> _Walk:
    """A probe's first window: the part that can hold its time (and every newer part that
    can, for an unbounded probe: the partitions made ahead of time, which are usually empty,
    are asked together with the current one)."""
    if probe.upper_us is None:
        ahead = sum(1 for p in layout.ranged if p.start_us is not None and p.start_us > now_us)
        return _Walk(probe.symbol, _NO_UPPER, cursor=0, window=ahead + 1)
    cursor = 0
    while cursor < len(layout.ranged) and not layout.ranged[cursor].may_hold_at_or_before(
        probe.upper_us
    ):
        cursor += 1
    walk = _Walk(probe.symbol, probe.upper_us, cursor=cursor, window=1)
    walk.done = cursor >= len(layout.ranged)
    return walk


def _later(a: asyncpg.Record | None, b: asyncpg.Record | None) -> asyncpg.Record | None:
    """The later quote of two candidates (timestamp, then id)."""
    if a is None or b is None:
        return a if b is None else b
    return a if (a["timestamp"], a["id"]) >= (b["timestamp"], b["id"]) else b


async def _ask(
    raw: asyncpg.Connection,
    layout: Layout,
    assignments: dict[int, list[int]],
    walks: list[_Walk],
    exchange: str | None,
) -> list[asyncpg.Record]:
    """Run one round: each assigned part asked for the last row of each of its walks."""
    branches: list[str] = []
    args: list[object] = []
    exchange_sql = ""
    if exchange is not None:
        args.append(exchange)
        exchange_sql = " AND o.exchange = $1::text"
    for index in sorted(assignments):
        numbers = assignments[index]
        part = layout.default if index == _DEFAULT else layout.ranged[index]
        assert part is not None
        n = len(args)
        args.extend(
            (numbers, [walks[i].symbol for i in numbers], [walks[i].upper_us for i in numbers])
        )
        branches.append(
            f"SELECT r.probe, {index:d} AS part, q.*"
            f" FROM unnest(${n + 1}::int4[], ${n + 2}::text[], ${n + 3}::int8[])"
            " AS r(probe, symbol, upper)"
            f" CROSS JOIN LATERAL (SELECT {QUOTE_SELECT} FROM {part.name} o"
            f" WHERE o.symbol = r.symbol AND o.timestamp <= r.upper{exchange_sql}"
            " ORDER BY o.timestamp DESC, o.id DESC LIMIT 1) q"
        )
    return list(await raw.fetch("\nUNION ALL\n".join(branches), *args))


def _symbols_sql(layout: Layout) -> str:
    """Every stored symbol, the newest ranged part holding it, and whether the default
    partition holds it: a skip scan of each part's ``(symbol, timestamp)`` index."""
    branches = []
    for index, part in [*enumerate(layout.ranged), (_DEFAULT, layout.default)]:
        if part is None:
            continue
        branches.append(
            "(WITH RECURSIVE s(symbol) AS ("
            f"(SELECT o.symbol FROM {part.name} o ORDER BY o.symbol, o.timestamp LIMIT 1)"
            " UNION ALL"
            f" SELECT (SELECT o.symbol FROM {part.name} o WHERE o.symbol > s.symbol"
            " ORDER BY o.symbol, o.timestamp LIMIT 1)"
            " FROM s WHERE s.symbol IS NOT NULL)"
            f" SELECT {index:d} AS part, s.symbol FROM s WHERE s.symbol IS NOT NULL)"
        )
    return (
        "SELECT d.symbol, min(d.part) FILTER (WHERE d.part >= 0) AS newest,"
        " bool_or(d.part < 0) AS in_default"
        f" FROM ({' UNION ALL '.join(branches)}) d GROUP BY d.symbol"
    )
