"""The writer's failure classes, each on a real server: nothing accepted is lost or stranded.

passing -> retried (tests/test_writer_faults.py); too big -> split; rows refused -> bisected and
dead-lettered; configuration -> kept, retried slowly, and said out loud with the fix. Every test
compares exact multisets of rows: what ``add`` accepted against what the table holds.

The module starts one private server (password auth for one role, trust for the rest) and makes
a database per test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner

from orderbook_store.cli import app as cli_app
from orderbook_store.compat import PostgreSQLManager
from orderbook_store.engine import create_engine
from orderbook_store.errors import (
    DatabaseUnavailable,
    RowsLost,
    WriterBackpressure,
    WriterClosed,
    WritesBlocked,
)
from orderbook_store.ops import migrations
from orderbook_store.pg.copy_in import (
    MAX_ROW_BYTES,
    copy_lines,
    decode_copy_line,
    encode_copy_text,
)
from orderbook_store.quote import to_row
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk
from orderbook_store.write import dead_letters
from orderbook_store.write.spool import Spool
from orderbook_store.write.spool_dirs import target_dirname
from orderbook_store.write.writer import Writer

from pgserver import TemporaryPostgres
from stored import as_multiset, expected, stored_multiset

pytestmark = [pytest.mark.fault, pytest.mark.slow]

PASSWORD_USER = "collector"
PASSWORD = "right-password-1"


@pytest.fixture(scope="module")
def server() -> Iterator[TemporaryPostgres]:
    with TemporaryPostgres() as pg:
        (pg.datadir / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
        )
        pg.psql("SELECT pg_reload_conf()")
        pg.psql(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'")
        yield pg


def new_database(server: TemporaryPostgres, *, migrate: bool = True, **create: str) -> str:
    name = f"w_{secrets.token_hex(4)}"
    options = " ".join(f"{key} '{value}'" for key, value in create.items())
    server.psql(f'CREATE DATABASE "{name}" {options}')
    if migrate:
        migrations.upgrade(server.settings(name), "head")
    return name


def quotes(count: int, seed: int = 5) -> list[dict[str, object]]:
    return QuoteWalk(("BTCUSDT", "ETHUSDT"), seed=seed).take(count)


@pytest.fixture
async def database(server: TemporaryPostgres) -> AsyncIterator[str]:
    name = new_database(server)
    yield name
    server.psql(f'DROP DATABASE "{name}" WITH (FORCE)')


async def execute(settings: Settings, sql: str) -> None:
    conn = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def add_until_pushed_back(
    repo: OrderbookRepository, feed: list[dict[str, object]]
) -> tuple[int, WriterBackpressure | None]:
    """``add`` until the writer pushes back; (quotes accepted, the backpressure error)."""
    accepted = 0
    for quote in feed:
        try:
            await repo.add(quote)
        except WriterBackpressure as exc:
            return accepted, exc
        accepted += 1
        if accepted % 100 == 0:
            await asyncio.sleep(0.005)  # let the writer try (and fail) to spool
    return accepted, None


# -- add while close runs ----------------------------------------------------------------


async def test_add_while_close_runs_is_refused_and_every_accepted_quote_is_stored(
    server: TemporaryPostgres, database: str, tmp_path: Path
) -> None:
    settings = server.settings(database, spool_dir=tmp_path, batch_size=500)
    engine = create_engine(settings)
    repo = OrderbookRepository(engine)
    feed = iter(quotes(400_000))
    accepted: list[dict[str, object]] = []
    refused: list[BaseException] = []

    async def producer() -> None:
        for number, quote in enumerate(feed):
            try:
                await repo.add(quote)
            except WriterClosed as exc:
                refused.append(exc)
                return
            accepted.append(quote)
            if number % 1_000 == 0:
                await asyncio.sleep(0)  # a collector awaits its websocket

    task = asyncio.create_task(producer())
    while len(accepted) < 50_000:
        await asyncio.sleep(0.01)
    await repo.close(timeout_s=60)  # while the producer is still adding
    await task
    await engine.dispose()

    assert refused, "the producer ran out of quotes before close() began"
    assert "closed" in str(refused[0])
    assert await stored_multiset(settings) == expected(accepted)
    stats = repo.stats()
    assert stats.rows_added == stats.rows_written == len(accepted)
    assert stats.rows_in_spool == 0
    assert not any(tmp_path.rglob("*.seg"))  # nothing stranded in the spool


async def test_add_many_racing_close_keeps_every_quote_it_took_and_says_how_many(
    server: TemporaryPostgres, database: str, tmp_path: Path
) -> None:
    """close() begins while add_many is between two batches: the call stops with
    WriterClosed.accepted, and exactly those quotes end up stored (written by the close, or
    replayed from the spool by the next writer), none lost, none twice."""
    settings = server.settings(database, spool_dir=tmp_path, batch_size=1_000)
    walk = QuoteWalk(("BTCUSDT", "ETHUSDT"), seed=41)
    offered: list[dict[str, object]] = []

    def feed() -> Iterator[dict[str, object]]:
        for _ in range(2_000_000):
            quote = walk.next_quote()
            offered.append(quote)
            yield quote

    engine = create_engine(settings)
    try:
        repo = OrderbookRepository(engine)
        adding = asyncio.create_task(repo.add_many(feed()))
        await asyncio.sleep(1.0)
        assert not adding.done(), "add_many finished before close() began"
        await repo.close(timeout_s=0.5)  # must not raise RowsLost
        with pytest.raises(WriterClosed) as closed:
            await adding
        accepted = closed.value.accepted
        assert 0 < accepted < 2_000_000
        assert f"the first {accepted} quote(s) were taken" in str(closed.value)
        assert repo.stats().rows_added == accepted
        # What the close did not write is in the spool: the next writer replays it.
        async with OrderbookRepository(engine) as again:
            await again.flush(timeout_s=60)
    finally:
        await engine.dispose()
    assert await stored_multiset(settings) == expected(offered[:accepted])
    assert not any(tmp_path.rglob("*.seg"))


# -- rows the server refuses -----------------------------------------------------------


async def test_a_row_the_server_refuses_is_dead_lettered_and_the_rest_flow(
    server: TemporaryPostgres, database: str, tmp_path: Path
) -> None:
    settings = server.settings(database, spool_dir=tmp_path)
    await execute(
        settings,
        "ALTER TABLE orderbook_data ADD CONSTRAINT no_test_symbol CHECK (symbol <> 'BADUSDT')",
    )
    good = quotes(2_000)
    bad = {**good[700], "symbol": "BADUSDT"}
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine, batch_size=5_000) as repo:
            await repo.add_many([*good[:700], bad, *good[700:]])
            await repo.flush(timeout_s=30)
            assert repo.stats().rows_refused == 1
            assert repo.stats().rows_written == 2_000

            # The rows behind it are not held up: the next 100 go through at once.
            more = quotes(100, seed=6)
            started = time.monotonic()
            for quote in more:
                await repo.add(quote)
            await repo.flush(timeout_s=10)
            assert time.monotonic() - started < 5
            letters = dead_letters.read(repo.dead_letter_path)
    finally:
        await engine.dispose()

    assert await stored_multiset(settings) == expected([*good, *more])
    assert len(letters) == 1
    (letter,) = letters
    assert letter.sqlstate == "23514"
    assert "no_test_symbol" in letter.reason
    assert letter.row["symbol"] == "BADUSDT"
    assert letter.row["timestamp"] == bad["timestamp"]
    assert letter.row["ask_price"] == to_row(bad)[5]
    assert letter.row_index == 700

    # Operators see them: doctor counts them, and dead-letters lists them with the reason.
    env = {"DATABASE_URL": server.url(database), "DB_SPOOL_DIR": str(tmp_path)}
    doctor = await asyncio.to_thread(CliRunner().invoke, cli_app, ["doctor", "--json"], env=env)
    check = next(c for c in json.loads(doctor.output)["checks"] if c["name"] == "dead letters")
    assert check["status"] == "warn"
    assert check["value"] == "1 rows refused"
    assert str(tmp_path) in check["detail"]
    listed = CliRunner().invoke(cli_app, ["dead-letters", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    (entry,) = json.loads(listed.output)
    assert entry["row"]["symbol"] == "BADUSDT"
    assert "no_test_symbol" in entry["reason"]
    table = CliRunner().invoke(cli_app, ["dead-letters"], env=env)
    assert table.exit_code == 0, table.output
    assert "BADUSDT" in table.output and "1 refused row(s)" in table.output


async def test_a_refused_row_in_the_spool_does_not_hold_up_replay_after_a_restart(
    server: TemporaryPostgres, database: str, tmp_path: Path
) -> None:
    """A batch spooled by a process that died, holding a row the server now refuses, is
    replayed with that row dead-lettered, once, and the rows behind it follow."""
    settings = server.settings(database, spool_dir=tmp_path)
    await execute(
        settings,
        "ALTER TABLE orderbook_data ADD CONSTRAINT small_amounts CHECK (ask_amount < 1000)",
    )
    spooled = quotes(300, seed=8)
    spooled[10] = {**spooled[10], "ask_amount": "5000"}
    spooled[250] = {**spooled[250], "ask_amount": "7000"}
    spool = Spool(tmp_path / target_dirname(settings.host, settings.port, settings.name))
    spool.open()
    spool.append(uuid.uuid4(), 300, encode_copy_text([to_row(q) for q in spooled]))
    spool.close()  # what a process that stopped leaves: a record for the next start

    later = quotes(100, seed=9)
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine) as repo:
            await repo.add_many(later)
            await repo.flush(timeout_s=30)
            stats = repo.stats()
            letters = dead_letters.read(repo.dead_letter_path)
    finally:
        await engine.dispose()
    kept = [q for i, q in enumerate(spooled) if i not in (10, 250)]
    assert await stored_multiset(settings) == expected([*kept, *later])
    assert stats.rows_refused == 2
    assert sorted(letter.row_index for letter in letters) == [10, 250]
    assert {letter.row["ask_amount"] for letter in letters} == {"5000", "7000"}


async def test_thousands_of_refused_rows_in_one_batch_fit_a_small_lock_table(
    tmp_path: Path,
) -> None:
    """Every other row refused: bisection must not pile up nested savepoints, whose locks run
    a server's shared lock table (here a small one) out of memory for every session."""
    with TemporaryPostgres(
        extra_conf={"max_locks_per_transaction": "10", "max_connections": "20"}
    ) as small:
        small.create_database("orderbook")
        settings = small.settings("orderbook", spool_dir=tmp_path)
        migrations.upgrade(settings, "head")
        await execute(
            settings,
            "ALTER TABLE orderbook_data ADD CONSTRAINT even_only CHECK (timestamp % 2 = 0)",
        )
        added = quotes(6_000)
        engine = create_engine(settings)
        try:
            async with OrderbookRepository(engine, batch_size=10_000) as repo:
                await repo.add_many(added)
                await repo.flush(timeout_s=120)
                stats = repo.stats()
                letters = dead_letters.read(repo.dead_letter_path)
        finally:
            await engine.dispose()
        kept = [q for q in added if int(q["timestamp"]) % 2 == 0]  # type: ignore[call-overload]
        assert 2_000 < len(kept) < 4_000
        assert await stored_multiset(settings) == expected(kept)
        assert stats.rows_refused == len(added) - len(kept) == len(letters)
        assert stats.rows_written == len(kept)


async def test_a_batch_whose_every_row_is_refused_is_settled_in_one_pass(
    server: TemporaryPostgres, database: str, tmp_path: Path
) -> None:
    """Every row of a big batch refused (a constraint a DBA added that the feed breaks): the
    search costs a statement or two per row, each under its own time limit, so it finishes
    in one attempt however long it takes, writes each dead letter once, and the rows behind
    it go through."""
    settings = server.settings(database, spool_dir=tmp_path, batch_size=10_000)
    await execute(
        settings,
        "ALTER TABLE orderbook_data ADD CONSTRAINT no_bad CHECK (symbol <> 'BADUSDT') NOT VALID",
    )
    bad = [{**quote, "symbol": "BADUSDT"} for quote in quotes(10_000)]
    good = quotes(100, seed=7)
    engine = create_engine(settings)
    writer = Writer(engine, settings, write_timeout_s=2.0)  # far less than the whole search
    try:
        await writer.add_many(bad)
        await writer.flush(timeout_s=300)
        refused = writer.stats()
        started = time.monotonic()
        await writer.add_many(good)
        await writer.flush(timeout_s=10)
        good_after_s = time.monotonic() - started
        await writer.close()
    finally:
        await engine.dispose()
    assert refused.rows_refused == 10_000
    assert refused.retries == 0, refused.last_error
    assert good_after_s < 5
    assert await stored_multiset(settings) == expected(good)
    entries = [json.loads(line) for line in writer.dead_letter_path.read_text().splitlines()]
    assert len(entries) == 10_000  # each refused row once: not once per attempt
    assert as_multiset(tuple(e["row"].values()) for e in entries) == expected(bad)  # type: ignore[misc]
    assert {e["sqlstate"] for e in entries} == {"23514"}


async def test_characters_the_database_encoding_cannot_store_are_dead_lettered(
    server: TemporaryPostgres, tmp_path: Path
) -> None:
    name = new_database(
        server, ENCODING="LATIN1", LC_COLLATE="C", LC_CTYPE="C", TEMPLATE="template0"
    )
    settings = server.settings(name, spool_dir=tmp_path)
    added = quotes(500)
    euro = {**added[123], "symbol": "EUR€USDT"}  # € has no LATIN1 code
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine) as repo:
            await repo.add_many([*added[:123], euro, *added[123:]])
            await repo.flush(timeout_s=30)
            letters = dead_letters.read(repo.dead_letter_path)
    finally:
        await engine.dispose()
        server.psql(f'DROP DATABASE "{name}" WITH (FORCE)')
    assert [letter.row["symbol"] for letter in letters] == ["EUR€USDT"]
    assert letters[0].sqlstate == "22P05"  # untranslatable_character


async def test_rows_a_unique_index_refuses_are_dead_lettered_once(
    server: TemporaryPostgres, database: str, tmp_path: Path
) -> None:
    settings = server.settings(database, spool_dir=tmp_path)
    await execute(
        settings, "CREATE UNIQUE INDEX one_quote_per_time ON orderbook_data (symbol, timestamp)"
    )
    added = quotes(1_000)
    repeats = [added[5], added[500], added[999]]  # the same symbol and time again
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine, batch_size=2_000) as repo:
            await repo.add_many([*added, *repeats])
            await repo.flush(timeout_s=30)
            letters = dead_letters.read(repo.dead_letter_path)
    finally:
        await engine.dispose()
    assert await stored_multiset(settings) == expected(added)
    assert sorted(letter.row_index for letter in letters) == [1_000, 1_001, 1_002]
    assert {letter.sqlstate for letter in letters} == {"23505"}


async def test_rows_a_deferred_constraint_refuses_at_commit_are_found_too(
    server: TemporaryPostgres, database: str, tmp_path: Path
) -> None:
    """A DEFERRABLE INITIALLY DEFERRED constraint refuses at COMMIT, where no savepoint can
    set the row aside: the careful pass checks constraints per statement instead."""
    settings = server.settings(database, spool_dir=tmp_path)
    await execute(
        settings,
        "ALTER TABLE orderbook_data ADD CONSTRAINT one_per_time UNIQUE (symbol, timestamp) "
        "DEFERRABLE INITIALLY DEFERRED",
    )
    added = quotes(1_000)
    repeats = [added[3], added[600]]
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine, batch_size=2_000) as repo:
            await repo.add_many([*added, *repeats])
            await repo.flush(timeout_s=30)
            stats = repo.stats()
            letters = dead_letters.read(repo.dead_letter_path)
    finally:
        await engine.dispose()
    assert await stored_multiset(settings) == expected(added)
    assert stats.rows_refused == 2 and stats.retries == 0, stats.last_error
    assert sorted(letter.row_index for letter in letters) == [1_000, 1_001]


# -- batches too big for the server's limits --------------------------------------------


async def test_a_300000_quote_burst_with_a_30ms_statement_timeout_is_stored_whole(
    server: TemporaryPostgres, database: str, tmp_path: Path
) -> None:
    settings = server.settings(database, spool_dir=tmp_path, statement_timeout_ms=30)
    added = QuoteWalk(("BTCUSDT", "ETHUSDT", "SOLUSDT"), seed=30).take(300_000)
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine) as repo:
            for quote in added:
                await repo.add(quote)  # one burst, never awaiting anything else
            await repo.flush(timeout_s=300)
            stats = repo.stats()
    finally:
        await engine.dispose()
    assert stats.rows_written == 300_000
    assert stats.rows_refused == 0
    assert await stored_multiset(server.settings(database)) == expected(added)


async def test_batches_and_spool_records_stay_within_their_row_bound(
    server: TemporaryPostgres, tmp_path: Path
) -> None:
    settings = Settings(  # nothing listens there: everything goes to the spool
        host="127.0.0.1",
        port=1,
        name="down",
        user="u",
        sslmode="disable",
        spool_dir=tmp_path,
        max_batch_rows=1_000,
    )
    added = quotes(25_000)
    engine = create_engine(settings)
    repo = OrderbookRepository(engine, max_pending=5_000, flush_interval_s=0.05)
    for quote in added:
        await repo.add(quote)
    await repo.close(timeout_s=0.5)
    await engine.dispose()

    spool = Spool(tmp_path / target_dirname(settings.host, settings.port, settings.name))
    spool.open()
    records = []
    while (record := spool.peek()) is not None:
        records.append(record)
        spool.ack(record)
    spool.close()
    assert max(r.rows for r in records) <= 1_000
    assert max(len(r.data) for r in records) <= 1_000 * MAX_ROW_BYTES
    spooled = [
        tuple(decode_copy_line(line).values()) for r in records for line in copy_lines(r.data)
    ]
    assert as_multiset(spooled) == expected(added)  # type: ignore[arg-type]


# -- database down and nowhere to keep the rows ----------------------------------------


async def test_with_the_database_down_and_no_spool_add_pushes_back_and_close_counts_the_loss(
    tmp_path: Path,
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    settings = Settings(
        host="127.0.0.1", port=1, name="down", user="u", sslmode="disable", connect_timeout_s=1
    )
    engine = create_engine(settings)
    repo = OrderbookRepository(
        engine, spool_dir=not_a_directory, max_pending=1_000, flush_interval_s=0.01
    )
    accepted, pushed_back = await add_until_pushed_back(repo, quotes(5_000))
    assert pushed_back is not None, "memory grew past max_pending without a word"
    assert "DB_MAX_PENDING=1000" in str(pushed_back)
    assert 1_000 - 100 <= accepted <= 1_000
    assert repo.stats().rows_added == accepted
    with pytest.raises(RowsLost) as lost:
        await repo.close(timeout_s=0.3)
    await engine.dispose()
    assert lost.value.rows == accepted
    assert f"{accepted} row(s)" in str(lost.value)


async def test_a_spool_directory_removed_while_the_database_is_down_is_no_safe_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The spool directory replaced by a file mid-run: appends to the segment that is gone
    are refused (not counted as kept), add() pushes back at max_pending, and close() counts
    the rows it could not keep."""
    spool_root = tmp_path / "spool"
    settings = Settings(
        host="127.0.0.1",
        port=1,
        name="down",
        user="u",
        sslmode="disable",
        connect_timeout_s=1,
        spool_dir=spool_root,
    )
    engine = create_engine(settings)
    repo = OrderbookRepository(engine, batch_size=100, max_pending=1_000, flush_interval_s=0.01)
    first = quotes(300)
    await repo.add_many(first)
    with pytest.raises(DatabaseUnavailable):
        await repo.flush(timeout_s=0.5)  # the 300 rows are now in the spool
    assert repo.stats().rows_in_spool == 300

    shutil.rmtree(spool_root)
    spool_root.write_text("not a directory any more")
    accepted, pushed_back = await add_until_pushed_back(repo, quotes(20_000, seed=12))
    assert pushed_back is not None, "rows kept going to a spool that no longer exists"
    assert accepted <= 2_000
    with caplog.at_level(logging.ERROR), pytest.raises(RowsLost) as lost:
        await repo.close(timeout_s=0.3)
    await engine.dispose()
    assert lost.value.rows == accepted


_OUTAGE_CHILD = """
import asyncio, gc, logging, sys
from orderbook_store.engine import create_engine
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk

def rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

async def main(rows, spool_dir):
    logging.disable(logging.CRITICAL)
    settings = Settings(host="127.0.0.1", port=1, name="down", user="u", sslmode="disable",
                        connect_timeout_s=1, spool_dir=spool_dir)
    engine = create_engine(settings)
    repo = OrderbookRepository(engine, max_pending=10_000, flush_interval_s=0.05)
    walk = QuoteWalk(("BTCUSDT", "ETHUSDT"), seed=3)
    for _ in range(30_000):  # warm up: the writer, the spool, the allocator
        await repo.add(walk.next_quote())
    await asyncio.sleep(0.5)
    gc.collect()
    before = rss_bytes()
    for number in range(rows):
        await repo.add(walk.next_quote())
        if number % 1_000 == 0:
            await asyncio.sleep(0)
    await asyncio.sleep(0.5)
    gc.collect()
    print(rss_bytes() - before, repo.stats().rows_in_spool, flush=True)
    await repo.close(timeout_s=0.5)
    await engine.dispose()

asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"""


def test_a_long_outage_holds_in_memory_only_what_is_not_yet_spooled(tmp_path: Path) -> None:
    """Database down for hours, spool working: rows the spool has are not also kept in
    memory, or a long outage ends in the collector being killed for its memory."""
    rows = 600_000  # about 60 MB of COPY text if it stayed in memory
    child = subprocess.run(
        [sys.executable, "-c", _OUTAGE_CHILD, str(rows), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    growth, in_spool = map(int, child.stdout.split())
    assert in_spool == rows + 30_000
    assert growth < 25 * 2**20, f"memory grew by {growth / 2**20:.0f} MB for {rows} spooled rows"


# -- configuration failures ---------------------------------------------------------------


async def test_an_unmigrated_database_blocks_writes_loudly_and_upgrade_lets_them_through(
    server: TemporaryPostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = new_database(server, migrate=False)
    settings = server.settings(name, spool_dir=tmp_path)
    added = quotes(1_000)
    caplog.set_level(logging.ERROR, logger="orderbook_store")
    engine = create_engine(settings)
    repo = OrderbookRepository(engine)
    try:
        await repo.add_many(added)
        with pytest.raises(WritesBlocked) as blocked:
            await repo.flush(timeout_s=30)
        assert "orderbook-store upgrade" in str(blocked.value)
        assert "1000 row(s)" in str(blocked.value)
        assert repo.stats().failure_class == "configuration"
        assert "orderbook-store upgrade" in (repo.stats().last_error or "")
        assert repo.writes_blocked is not None
        assert any("orderbook-store upgrade" in r.getMessage() for r in caplog.records)

        migrations.upgrade(settings, "head")  # the fix, while the writer runs
        await repo.flush(timeout_s=30)
        assert repo.writes_blocked is None
        assert repo.stats().last_error is None
    finally:
        await repo.close(timeout_s=5)
        await engine.dispose()
    assert await stored_multiset(settings) == expected(added)
    server.psql(f'DROP DATABASE "{name}" WITH (FORCE)')


async def test_a_role_without_insert_is_told_the_grant_and_writes_once_granted(
    server: TemporaryPostgres, database: str, tmp_path: Path
) -> None:
    role = f"reader_{secrets.token_hex(3)}"
    server.psql(f"CREATE ROLE {role} LOGIN")
    server.psql(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}", database)
    settings = server.settings(database, spool_dir=tmp_path, user=role)
    added = quotes(200)
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine) as repo:
            await repo.add_many(added)
            with pytest.raises(WritesBlocked, match=f"GRANT INSERT ON .* TO {role}"):
                await repo.flush(timeout_s=30)
            server.psql(
                f"GRANT INSERT ON orderbook_data, orderbook_write_batches TO {role}; "
                f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}",
                database,
            )
            await repo.flush(timeout_s=30)
    finally:
        await engine.dispose()
        server.psql(f"DROP OWNED BY {role}", database)
        server.psql(f"DROP ROLE {role}")
    assert await stored_multiset(server.settings(database)) == expected(added)


async def test_a_wrong_password_says_so_and_the_rows_wait_for_the_right_one(
    server: TemporaryPostgres, database: str, tmp_path: Path
) -> None:
    server.psql(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {PASSWORD_USER}", database)
    server.psql(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {PASSWORD_USER}", database)
    wrong = "wrong-password-2"
    settings = server.settings(database, spool_dir=tmp_path, user=PASSWORD_USER, password=wrong)
    added = quotes(300)
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine) as repo:
            await repo.add_many(added)
            with pytest.raises(WritesBlocked) as blocked:
                await repo.flush(timeout_s=30)
            assert "DB_PASSWORD" in str(blocked.value)
            assert wrong not in str(blocked.value)
            assert wrong not in repr(repo.stats())
            # The operator sets the password the collector was deployed with.
            server.psql(f"ALTER ROLE {PASSWORD_USER} PASSWORD '{wrong}'")
            await repo.flush(timeout_s=30)
    finally:
        server.psql(f"ALTER ROLE {PASSWORD_USER} PASSWORD '{PASSWORD}'")
        await engine.dispose()
        server.psql(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {PASSWORD_USER}", database)
        server.psql(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {PASSWORD_USER}", database)
    assert await stored_multiset(server.settings(database)) == expected(added)


async def test_tls_required_of_a_server_without_tls_is_named_and_the_rows_kept(
    server: TemporaryPostgres, database: str, tmp_path: Path
) -> None:
    settings = server.settings(database, spool_dir=tmp_path, sslmode="require")
    added = quotes(400)
    engine = create_engine(settings)
    repo = OrderbookRepository(engine)
    await repo.add_many(added)
    with pytest.raises(WritesBlocked, match="DB_SSLMODE=disable or prefer"):
        await repo.flush(timeout_s=30)
    with pytest.raises(WritesBlocked, match="400 row"):
        await repo.close(timeout_s=5)  # kept in the spool, and said so
    await engine.dispose()

    fixed = settings.model_copy(update={"sslmode": "disable"})  # the same database
    engine = create_engine(fixed)
    try:
        async with OrderbookRepository(engine) as repo:
            await repo.flush(timeout_s=30)  # the spooled rows come first
    finally:
        await engine.dispose()
    assert await stored_multiset(fixed) == expected(added)


async def test_the_old_collector_is_told_what_to_fix_and_shutdown_fails(
    server: TemporaryPostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = new_database(server, migrate=False)
    config = {
        "storage": {"type": "postgresql"},
        "postgresql": {
            "host": "127.0.0.1",
            "port": server.port,
            "database": name,
            "user": "postgres",
            "sslmode": "disable",
        },
    }
    caplog.set_level(logging.ERROR, logger="orderbook_store")
    manager = PostgreSQLManager(config)
    manager.settings = manager.settings.model_copy(update={"spool_dir": tmp_path})
    await manager.connect()
    added = quotes(100)
    for record in added[:99]:
        assert await manager.save_record(record)  # kept (spooled), not dropped
    assert manager.repository is not None
    for _ in range(200):  # the writer's first attempt fails
        if manager.repository.writes_blocked is not None:
            break
        await asyncio.sleep(0.05)
    assert await manager.save_record(added[99])  # still kept, and now said
    told = [
        r.getMessage()
        for r in caplog.records
        if r.name == "orderbook_store.compat" and r.levelno == logging.ERROR
    ]
    assert any("orderbook-store upgrade" in message for message in told)
    with pytest.raises(WritesBlocked, match="orderbook-store upgrade"):
        await manager.shutdown()

    migrations.upgrade(server.settings(name), "head")
    manager = PostgreSQLManager(config)
    manager.settings = manager.settings.model_copy(update={"spool_dir": tmp_path})
    await manager.connect()
    one_more = quotes(1, seed=7)
    assert await manager.save_record(one_more[0])
    await manager.shutdown()  # the next writer writes what was kept, then its own
    assert await stored_multiset(server.settings(name)) == expected([*added, *one_more])
    server.psql(f'DROP DATABASE "{name}" WITH (FORCE)')
