"""The buffered writer through the repository: add, group commit, spill, exactly-once replay."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.errors import InvalidQuote
from orderbook_store.models import QUOTE_COLUMNS
from orderbook_store.pg.copy_in import encode_copy_text
from orderbook_store.quote import to_row
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk
from orderbook_store.write.spool import Spool
from orderbook_store.write.spool_dirs import target_dirname

from stored import expected, stored_multiset


def quotes(count: int, seed: int = 3) -> list[dict[str, object]]:
    return QuoteWalk(("BTCUSDT", "ETHUSDT", "SOLUSDT"), seed=seed).take(count)


@pytest.fixture
async def writer_repo(
    engine: AsyncEngine, settings: Settings, tmp_path: Path
) -> AsyncIterator[OrderbookRepository]:
    repo = OrderbookRepository(engine, spool_dir=tmp_path / "spool", batch_size=100)
    try:
        yield repo
    finally:
        await repo.close(timeout_s=10)


async def test_flush_commits_every_added_quote_exactly_once(
    writer_repo: OrderbookRepository, settings: Settings
) -> None:
    added = quotes(5_000)
    for quote in added:
        await writer_repo.add(quote)
    await writer_repo.flush()

    assert await stored_multiset(settings) == expected(added)
    stats = writer_repo.stats()
    assert stats.rows_added == stats.rows_written == 5_000
    assert stats.rows_spooled == stats.rows_rejected == stats.retries == 0
    assert stats.batches >= 1
    assert stats.flush_latency_p50_s is not None and stats.flush_latency_p99_s is not None


async def test_quotes_are_written_without_flush_within_the_interval(
    engine: AsyncEngine, settings: Settings, tmp_path: Path
) -> None:
    async with OrderbookRepository(
        engine, spool_dir=tmp_path, batch_size=1_000, flush_interval_s=0.05
    ) as repo:
        added = quotes(10)  # far below batch_size: only the interval can write them
        for quote in added:
            await repo.add(quote)
        for _ in range(200):
            if repo.stats().rows_written == 10:
                break
            await asyncio.sleep(0.05)
        assert await stored_multiset(settings) == expected(added)


async def test_an_invalid_quote_raises_and_costs_no_other_quote(
    writer_repo: OrderbookRepository, settings: Settings
) -> None:
    good = quotes(3)
    await writer_repo.add(good[0])
    with pytest.raises(InvalidQuote) as excinfo:
        await writer_repo.add({**good[1], "ask_price": "-1"})
    assert excinfo.value.field == "ask_price"
    await writer_repo.add(good[2])
    with pytest.raises(InvalidQuote):
        await writer_repo.add_many([good[1], {**good[1], "timestamp": 1_582_329_601_096}])
    await writer_repo.flush()

    assert await stored_multiset(settings) == expected([good[0], good[2], good[1]])
    assert writer_repo.stats().rows_rejected == 2


async def test_group_commit_batches_grow_while_a_write_is_in_flight(
    engine: AsyncEngine, settings: Settings, tmp_path: Path
) -> None:
    """With the table locked, the first COPY waits; everything added meanwhile goes in one."""
    blocker = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    repo = OrderbookRepository(engine, spool_dir=tmp_path, batch_size=10)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE orderbook_data IN SHARE MODE")
        added = quotes(2_000)
        for i, quote in enumerate(added):
            await repo.add(quote)
            if i % 50 == 0:
                await asyncio.sleep(0.001)  # let the writer start (and block on) a write
        await tx.rollback()
        await repo.flush()
    finally:
        await blocker.close()
        await repo.close()

    assert await stored_multiset(settings) == expected(added)
    stats = repo.stats()
    assert stats.batches < 2_000 // 10 // 4, stats
    assert stats.rows_written == 2_000


async def test_rows_beyond_max_pending_go_to_the_spool_and_arrive(
    engine: AsyncEngine, settings: Settings, tmp_path: Path
) -> None:
    blocker = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    repo = OrderbookRepository(engine, spool_dir=tmp_path, batch_size=10, max_pending=100)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE orderbook_data IN SHARE MODE")
        added = quotes(3_000)
        for i, quote in enumerate(added):
            await repo.add(quote)
            assert repo.stats().rows_pending <= 100
            if i % 100 == 0:
                await asyncio.sleep(0.001)
        for _ in range(400):  # the spool thread appends (and fsyncs) in the background
            if repo.stats().rows_spooled > 0:
                break
            await asyncio.sleep(0.05)
        assert repo.stats().rows_spooled > 0
        await tx.rollback()
        await repo.flush()
    finally:
        await blocker.close()
        await repo.close()

    assert await stored_multiset(settings) == expected(added)
    stats = repo.stats()
    assert stats.rows_written == 3_000
    assert stats.rows_replayed == stats.rows_spooled > 0
    assert stats.rows_in_spool == 0


async def test_a_replayed_batch_already_in_the_ledger_is_not_written_twice(
    engine: AsyncEngine, settings: Settings, tmp_path: Path
) -> None:
    """A batch whose COMMIT outcome was unknown comes back from the spool: skipped."""
    added = quotes(500)
    async with OrderbookRepository(engine, spool_dir=tmp_path) as first:
        await first.add_many(added)
        await first.flush()
    conn = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        ids = [r[0] for r in await conn.fetch("SELECT batch_id FROM orderbook_write_batches")]
    finally:
        await conn.close()
    assert len(ids) >= 1
    # What a crash between COMMIT and the acknowledgement leaves behind: the committed
    # batch still in the spool (same id), plus one that never reached the server.
    late = quotes(20, seed=99)
    spool_root = tmp_path / target_dirname(settings.host, settings.port, settings.name)
    with Spool(spool_root) as leftover:
        for batch_id in ids:
            leftover.append(batch_id, len(added), encode_copy_text([to_row(q) for q in added]))
        leftover.append(uuid.uuid4(), 20, encode_copy_text([to_row(q) for q in late]))

    async with OrderbookRepository(engine, spool_dir=tmp_path) as second:
        await second.flush()  # the first flush also replays what the spool holds
        stats = second.stats()
    assert await stored_multiset(settings) == expected(added) + expected(late)
    assert stats.rows_replayed == 20
    assert not spool_root.exists()


async def test_insert_many_copies_rows_all_or_nothing(
    engine: AsyncEngine, settings: Settings, tmp_path: Path
) -> None:
    repo = OrderbookRepository(engine, spool_dir=tmp_path)
    rows = quotes(25_000)
    assert await repo.insert_many(iter(rows)) == 25_000
    assert await stored_multiset(settings) == expected(rows)

    bad = [*quotes(15_000, seed=8), {**rows[0], "symbol": ""}]
    with pytest.raises(InvalidQuote):
        await repo.insert_many(bad)
    assert await stored_multiset(settings) == expected(rows)
    assert await repo.insert_many([]) == 0
    await repo.close()


async def test_logs_and_errors_never_show_the_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from orderbook_store.engine import create_engine
    from orderbook_store.errors import DatabaseUnavailable

    secret = "Very-Secret-pw-7"
    unreachable = Settings(
        host="127.0.0.1", port=1, name="nowhere", user="u", password=secret, sslmode="disable"
    )
    engine = create_engine(unreachable)
    caplog.set_level(logging.DEBUG)
    repo = OrderbookRepository(engine, spool_dir=tmp_path, flush_interval_s=0.01)
    added = quotes(50)
    for quote in added:
        await repo.add(quote)  # the server is unreachable: add still just buffers
    assert repo.stats().rows_added == 50
    with pytest.raises(DatabaseUnavailable) as excinfo:
        await repo.flush(timeout_s=0.5)
    assert "spool" in str(excinfo.value)
    assert repo.stats().rows_in_spool == 50
    await repo.close(timeout_s=0.2)
    await engine.dispose()
    assert secret not in str(excinfo.value)
    assert secret not in caplog.text
    assert secret not in repr(repo.stats())
    assert "write failed" in caplog.text
    closing = [r for r in caplog.records if "writer closed" in r.getMessage()]
    assert len(closing) == 1 and "50 row(s)" in closing[0].getMessage()


async def test_add_after_close_is_refused(engine: AsyncEngine, tmp_path: Path) -> None:
    from orderbook_store.errors import OrderbookStoreError

    repo = OrderbookRepository(engine, spool_dir=tmp_path)
    await repo.add(quotes(1)[0])
    await repo.close()
    with pytest.raises(OrderbookStoreError, match="closed"):
        await repo.add(quotes(2)[1])
    assert repo.stats().rows_added == repo.stats().rows_written == 1


async def test_old_ledger_entries_are_pruned_and_recent_ones_kept(
    engine: AsyncEngine, settings: Settings, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        old, recent = uuid.uuid4(), uuid.uuid4()
        await conn.execute(
            "INSERT INTO orderbook_write_batches (batch_id, rows, committed_at) "
            "VALUES ($1, 1, now() - interval '8 days'), ($2, 1, now() - interval '6 days')",
            old,
            recent,
        )
        async with OrderbookRepository(engine, spool_dir=tmp_path) as repo:
            await repo.add(quotes(1)[0])
            await repo.flush()  # the writer prunes once it has written (then hourly)
            for _ in range(100):
                left = {
                    r[0] for r in await conn.fetch("SELECT batch_id FROM orderbook_write_batches")
                }
                if old not in left:
                    break
                await asyncio.sleep(0.05)
    finally:
        await conn.close()
    assert old not in left
    assert recent in left
    assert len(left) == 2  # the recent one and the batch just written


async def test_without_a_usable_spool_the_writer_still_writes(
    engine: AsyncEngine, settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    caplog.set_level(logging.ERROR, logger="orderbook_store")
    added = quotes(300)
    async with OrderbookRepository(engine, spool_dir=not_a_directory) as repo:
        await repo.add_many(added)
        await repo.flush()
    assert await stored_multiset(settings) == expected(added)
    assert any("spool unavailable" in r.getMessage() for r in caplog.records)


async def test_the_real_file_streamed_through_add_is_stored_row_for_row_in_order(
    writer_repo: OrderbookRepository, settings: Settings, real_quotes_text: str
) -> None:
    """All 9,999 rows (416 share a timestamp with another), in the order added, exactly."""
    records = list(csv.DictReader(io.StringIO(real_quotes_text)))
    assert len(records) == 9_999
    for record in records:
        await writer_repo.add(record)  # strings straight from the file, as a collector has them
    await writer_repo.flush()

    conn = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        stored = await conn.fetch(
            "SELECT " + ", ".join(f'"{c}"' for c in QUOTE_COLUMNS) + " FROM orderbook_data"
            " ORDER BY id"
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in stored] == [
        (
            r["exchange"],
            r["symbol"],
            int(r["timestamp"]),
            int(r["local_timestamp"]),
            *(Decimal(r[c]) for c in QUOTE_COLUMNS[4:]),
        )
        for r in records
    ]


async def test_a_value_beyond_decimals_range_costs_only_its_own_quote(
    writer_repo: OrderbookRepository, settings: Settings
) -> None:
    from orderbook_store.compat import PostgreSQLManager

    added = quotes(300)
    hostile = [
        {**added[0], "ask_price": "1e999999999999999999999"},
        {**added[0], "bid_amount": "1e-99999999999999999999"},
        {**added[0], "ask_amount": "0e9999999999999999999"},
    ]
    with pytest.raises(InvalidQuote, match="exponent"):
        await writer_repo.add_many([*added[:100], *hostile, *added[100:]])
    await writer_repo.flush()
    assert writer_repo.stats().rows_rejected == 3
    assert await stored_multiset(settings) == expected(added)

    with pytest.raises(InvalidQuote, match="ask_price"):
        await writer_repo.insert_many([*quotes(10, seed=4), hostile[0]])  # all or nothing
    assert await stored_multiset(settings) == expected(added)

    manager = PostgreSQLManager({"postgresql": {}})
    manager.repository = writer_repo  # the old collector's entry point, on this repository
    assert await manager.save_record(hostile[1]) is False
    assert manager.rejected == 1
