"""The writer under faults: each ends with exactly the quotes added, none missing, none twice.

Every test here starts its own PostgreSQL server (tests/pgserver.py) so it can stop it or kill
its backends without disturbing anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from orderbook_store.engine import create_engine
from orderbook_store.ops import migrations
from orderbook_store.pg.copy_in import encode_copy_text
from orderbook_store.quote import to_row
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk
from orderbook_store.write import dead_letters
from orderbook_store.write.spool import Spool
from orderbook_store.write.spool_dirs import target_dirname

from pgserver import TemporaryPostgres
from stored import Row, as_multiset, expected, stored_multiset

pytestmark = [pytest.mark.fault, pytest.mark.slow]

APP = "obs-writer-under-test"


@pytest.fixture
def pg() -> Iterator[TemporaryPostgres]:
    with TemporaryPostgres() as server:
        server.create_database("orderbook")
        migrations.upgrade(server.settings("orderbook"), "head")
        yield server


def writer_settings(pg: TemporaryPostgres) -> Settings:
    return pg.settings("orderbook", application_name=APP, pool_size=2)


async def test_add_survives_server_stop_and_start_without_loss(
    pg: TemporaryPostgres, tmp_path: Path
) -> None:
    settings = writer_settings(pg)
    engine = create_engine(settings)
    repo = OrderbookRepository(engine, spool_dir=tmp_path, batch_size=200, flush_interval_s=0.05)
    added = QuoteWalk(seed=21).take(15_000)
    try:
        for i, quote in enumerate(added):
            await repo.add(quote)
            if i % 200 == 0:
                # ~2 s with the server down, while quotes keep coming
                await asyncio.sleep(0.08 if 5_000 <= i < 10_000 else 0.001)
            if i == 5_000:
                await asyncio.to_thread(pg.stop)  # connections drop mid-stream
                stopped = repo.stats()
            if i == 10_000:
                down = repo.stats()
                await asyncio.to_thread(pg.start)
        await repo.flush(timeout_s=120)
        stats = repo.stats()
    finally:
        await repo.close(timeout_s=5)
        await engine.dispose()

    assert await stored_multiset(settings) == expected(added)
    # The fault path was taken: writes failed, rows were spooled while down, then replayed.
    assert down.rows_added - stopped.rows_added == 5_000
    assert down.rows_spooled > 0
    assert stats.retries > 0
    assert stats.rows_written == 15_000
    assert stats.rows_replayed == stats.rows_spooled
    assert stats.rows_in_spool == 0


async def test_backend_killed_during_copy_loses_and_duplicates_nothing(
    pg: TemporaryPostgres, tmp_path: Path
) -> None:
    settings = writer_settings(pg)
    engine = create_engine(settings)
    repo = OrderbookRepository(engine, spool_dir=tmp_path, batch_size=3_000, flush_interval_s=0.05)
    admin = await asyncpg.connect(pg.url("orderbook"))
    locker = await asyncpg.connect(pg.url("orderbook"))
    find_copy = (
        "SELECT pid FROM pg_stat_activity "
        "WHERE application_name = $1 AND state = 'active' AND query ILIKE 'COPY%'"
    )
    kills = {"streaming": 0, "waiting": 0}

    async def killer() -> None:
        # First, a COPY caught while its rows stream in (if the timing lets us see one) ...
        for _ in range(3_000):
            pids = [r[0] for r in await admin.fetch(find_copy, APP)]
            if pids:
                for pid in pids:
                    kills["streaming"] += bool(
                        await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                    )
                break
            await asyncio.sleep(0.001)
        # ... then two that certainly are mid-statement: held up by a lock, then killed.
        # (The lock is held on a second connection: pg_stat_activity read inside a transaction
        # is a snapshot that would never show the writer arriving.)
        while kills["waiting"] < 2:
            async with locker.transaction():
                await locker.execute("LOCK TABLE orderbook_data IN SHARE MODE")
                for _ in range(20_000):
                    pids = [r[0] for r in await admin.fetch(find_copy, APP)]
                    if pids:
                        break
                    await asyncio.sleep(0.001)
                for pid in pids:
                    kills["waiting"] += bool(
                        await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                    )
            await asyncio.sleep(0.1)

    walk = QuoteWalk(seed=22)
    added: list[dict[str, object]] = []
    task = asyncio.create_task(killer())
    try:
        while not task.done() and len(added) < 400_000:
            chunk = walk.take(1_000)
            for quote in chunk:
                await repo.add(quote)
            added.extend(chunk)
            await asyncio.sleep(0.002)  # a collector waits for its websocket now and then
        await task
        await repo.flush(timeout_s=120)
        stats = repo.stats()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await admin.close()
        await locker.close()
        await repo.close(timeout_s=5)
        await engine.dispose()

    assert kills["waiting"] == 2
    assert stats.retries >= 2
    assert await stored_multiset(settings) == expected(added)
    assert stats.rows_written == len(added)


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from orderbook_store import OrderbookRepository, Settings, create_engine
    from orderbook_store.errors import DatabaseUnavailable
    from orderbook_store.synthetic import QuoteWalk

    async def main(url, spool, seed):
        engine = create_engine(Settings(database_url=url, pool_size=2))
        repo = OrderbookRepository(engine, spool_dir=spool, batch_size=100,
                                   flush_interval_s=0.05)
        walk = QuoteWalk(("BTCUSDT", "ETHUSDT"), seed=seed)
        added = 0
        while True:
            for quote in walk.take(250):
                await repo.add(quote)
            added += 250
            try:
                await repo.flush(timeout_s=0.3)
            except DatabaseUnavailable:
                pass  # durable in the spool
            print("durable", added, flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


@pytest.mark.parametrize("refuse_every", [None, 7], ids=["all-good", "one-in-7-refused"])
def test_sigkilled_writer_is_replayed_by_the_next_process(
    pg: TemporaryPostgres, tmp_path: Path, refuse_every: int | None
) -> None:
    """Killed while the database is down; the next process replays the spool. With a
    constraint refusing one row in seven, the others are stored and the refused ones are
    dead letters: none lost, none twice."""
    seed = 23
    if refuse_every is not None:
        pg.psql(
            "ALTER TABLE orderbook_data ADD CONSTRAINT some_refused "
            f"CHECK (timestamp % {refuse_every} <> 0) NOT VALID",
            "orderbook",
        )

    def refused(quote: dict[str, object]) -> bool:
        return refuse_every is not None and int(str(quote["timestamp"])) % refuse_every == 0

    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, pg.url("orderbook"), str(tmp_path), str(seed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    durable = 0
    try:
        while durable < 2_000:
            durable = int(child.stdout.readline().split()[1])
        pg.stop()  # from here on the child's batches can only go to the spool
        at_stop = durable
        while durable < at_stop + 1_500:
            durable = int(child.stdout.readline().split()[1])
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert list(tmp_path.glob("*/*/*.seg")), "the killed writer left a spool behind"

    pg.start()
    settings = pg.settings("orderbook")

    async def replay() -> tuple[Counter[Row], int, list[dead_letters.DeadLetter]]:
        engine = create_engine(settings)
        async with OrderbookRepository(engine, spool_dir=tmp_path) as repo:
            await repo.flush(timeout_s=120)  # a fresh writer's first flush replays the spool
            replayed = repo.stats().rows_replayed
            letters = dead_letters.read(repo.dead_letter_path)
        await engine.dispose()
        return await stored_multiset(settings), replayed, letters

    stored, replayed, letters = asyncio.run(replay())
    # Everything reported durable is there: the first `made` quotes the child made, less the
    # refused ones, so nothing is missing in between and nothing is there twice.
    walk = QuoteWalk(("BTCUSDT", "ETHUSDT"), seed=seed)
    made: list[dict[str, object]] = []
    good = 0
    while good < sum(stored.values()):
        made.append(walk.next_quote())
        good += not refused(made[-1])
    assert len(made) >= durable
    assert replayed > 0  # (how much the spool held depends on how far the child had got)
    assert stored == expected(q for q in made if not refused(q))
    assert not list(tmp_path.glob("*/*/*.seg"))
    dead = as_multiset(tuple(letter.row.values()) for letter in letters)  # type: ignore[misc]
    # Each refused row among them once; refused rows made after the last stored one may be
    # dead letters too (their batch got that far), and nothing else.
    assert dead - expected(q for q in made if refused(q)) <= expected(
        q for q in walk.take(250) if refused(q)
    )
    assert not expected(q for q in made if refused(q)) - dead


async def test_a_torn_last_spool_record_is_reported_and_the_rest_replayed(
    pg: TemporaryPostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = writer_settings(pg)
    groups = [QuoteWalk(seed=30 + i).take(300) for i in range(3)]
    spool_root = tmp_path / target_dirname(settings.host, settings.port, settings.name)
    with Spool(spool_root) as spool:
        for group in groups:
            spool.append(uuid.uuid4(), len(group), encode_copy_text([to_row(q) for q in group]))
    (segment,) = spool_root.glob("*/*.seg")
    last_record = len(encode_copy_text([to_row(q) for q in groups[2]])) + 12 + 28
    with open(segment, "r+b") as fh:  # the crash came halfway through the last write
        fh.truncate(segment.stat().st_size - last_record // 2)

    caplog.set_level(logging.WARNING, logger="orderbook_store")
    engine = create_engine(settings)
    async with OrderbookRepository(engine, spool_dir=tmp_path) as repo:
        await repo.flush(timeout_s=60)
        stats = repo.stats()
    await engine.dispose()

    assert await stored_multiset(settings) == expected(groups[0]) + expected(groups[1])
    assert stats.rows_replayed == 600
    warnings = [r.getMessage() for r in caplog.records if "damaged record" in r.getMessage()]
    assert len(warnings) == 1
    assert str(segment) in warnings[0] and "torn" in warnings[0]
    assert not list(spool_root.glob("*/*.seg"))


async def test_close_with_the_server_down_leaves_rows_in_the_spool_for_the_next_start(
    pg: TemporaryPostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = writer_settings(pg)
    pg.stop()
    caplog.set_level(logging.INFO, logger="orderbook_store")
    added = QuoteWalk(seed=40).take(1_000)
    engine = create_engine(settings)
    repo = OrderbookRepository(engine, spool_dir=tmp_path, flush_interval_s=0.05)
    for quote in added:
        await repo.add(quote)  # the server is down: add only buffers, it never waits
    assert repo.stats().rows_added == 1_000
    await repo.close(timeout_s=0.5)
    await engine.dispose()
    closing = [r.getMessage() for r in caplog.records if "writer closed" in r.getMessage()]
    assert len(closing) == 1
    assert "1000 row(s)" in closing[0] and "stay in the spool" in closing[0]

    pg.start()
    engine = create_engine(settings)
    async with OrderbookRepository(engine, spool_dir=tmp_path) as repo:
        await repo.flush(timeout_s=60)
    await engine.dispose()
    assert await stored_multiset(settings) == expected(added)
