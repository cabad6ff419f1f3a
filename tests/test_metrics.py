"""Prometheus metrics: what a scrape of ``metrics.serve``'s endpoint shows after real writes.

Each test writes through a real repository into its own database and reads the real HTTP
endpoint (or the registry it serves), comparing exact counts with what was added.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

import orderbook_store
from orderbook_store import metrics
from orderbook_store.compat import DataManager
from orderbook_store.engine import create_engine
from orderbook_store.errors import InvalidArgument, InvalidQuote, WritesBlocked
from orderbook_store.ops import migrations
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk

from stored import expected, stored_multiset

#: Trust auth on the test server lets any password in; the exposition must never show it.
SECRET = "metrics-Pa55word-must-not-show"

Scrape = dict[tuple[str, str], float]


def quotes(count: int, seed: int = 7) -> list[dict[str, object]]:
    return QuoteWalk(("BTCUSDT", "ETHUSDT"), seed=seed).take(count)


@pytest.fixture
def new_settings(make_database: Callable[[], str], tmp_path: Path) -> Callable[..., Settings]:
    """Settings (with a password) for a new database of this test's own."""

    async def make(*, migrate: bool = True, **overrides: object) -> Settings:
        url = await asyncio.to_thread(make_database)  # it runs its own event loop
        settings = Settings(
            database_url=url,
            password=SECRET,
            pool_size=2,
            spool_dir=tmp_path / secrets.token_hex(4),
            **overrides,
        )
        if migrate:
            await asyncio.to_thread(migrations.upgrade, settings, "head")
        return settings

    return make


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def served(registry: CollectorRegistry) -> Iterator[Callable[..., int]]:
    """``serve(*sources)`` on this test's registry, local and on a free port; stopped after."""
    servers = []

    def start(*sources: metrics.Exportable) -> int:
        server = metrics.serve(*sources, port=0, addr="127.0.0.1", registry=registry)
        servers.append(server)
        return int(server.server_port)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return str(response.read().decode())


def parse(text: str) -> Scrape:
    """{(sample name, database label or le): value}; ``le`` keys for histogram buckets."""
    samples: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith(metrics.PREFIX):
                continue
            key = sample.labels["database"]
            if "le" in sample.labels:
                key += " le=" + sample.labels["le"]
            samples[(sample.name.removeprefix(metrics.PREFIX), key)] = sample.value
    return samples


async def scrape(port: int) -> tuple[str, Scrape]:
    text = await asyncio.to_thread(fetch, port)
    return text, parse(text)


def label(settings: Settings) -> str:
    return f"{settings.name}@{settings.host}:{settings.port}"


@pytest.fixture
async def engines() -> AsyncIterator[Callable[[Settings], AsyncEngine]]:
    made = []

    def make(settings: Settings) -> AsyncEngine:
        engine = create_engine(settings)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await engine.dispose()


async def execute(settings: Settings, sql: str) -> None:
    conn = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# -- counts ------------------------------------------------------------------------------


async def test_the_endpoint_counts_written_refused_and_rejected_rows_exactly(
    new_settings: Callable[..., Settings], served: Callable[..., int], engines: Callable
) -> None:
    settings = await new_settings()
    # A rule the table did not have: the server refuses the one row breaking it.
    await execute(
        settings,
        "ALTER TABLE orderbook_data ADD CONSTRAINT no_bad_symbol "
        "CHECK (symbol <> 'BADUSDT') NOT VALID",
    )
    good = quotes(1_500)
    refused = {**good[0], "symbol": "BADUSDT"}
    invalid = [{**good[1], "bid_price": -1.0}, {**good[2], "timestamp": "yesterday"}]
    async with OrderbookRepository(engines(settings), batch_size=400) as repo:
        port = served(repo)
        _, before = await scrape(port)
        db = label(settings)
        assert before[("rows_added_total", db)] == 0
        assert before[("batch_latency_seconds_count", db)] == 0

        with pytest.raises(InvalidQuote):
            await repo.add_many([*good[:700], refused, *invalid, *good[700:]])
        await repo.flush(timeout_s=30)
        text, after = await scrape(port)
        stats = repo.stats()

    assert after[("rows_added_total", db)] == 1_501
    assert after[("rows_written_total", db)] == 1_500
    assert after[("rows_refused_total", db)] == 1
    assert after[("rows_rejected_total", db)] == 2
    assert after[("rows_spooled_total", db)] == 0
    assert after[("rows_replayed_total", db)] == 0
    assert after[("retries_total", db)] == 0
    assert after[("rows_pending", db)] == 0
    assert after[("rows_in_spool", db)] == 0
    assert after[("writes_blocked", db)] == 0
    assert stats.batches >= 1
    assert after[("batches_total", db)] == stats.batches
    # Every committed batch is in the histogram; its buckets add up.
    assert after[("batch_latency_seconds_count", db)] == stats.batches
    assert after[("batch_latency_seconds_bucket", f"{db} le=+Inf")] == stats.batches
    assert 0 < after[("batch_latency_seconds_sum", db)] < 30 * stats.batches
    bounds = [
        after[("batch_latency_seconds_bucket", f"{db} le={metrics_bound}")]
        for metrics_bound in ("0.005", "0.1", "1.0", "60.0", "+Inf")
    ]
    assert bounds == sorted(bounds)
    assert 0 <= after[("seconds_since_last_commit", db)] < 30
    assert SECRET not in text
    assert settings.user not in text.replace("orderbook_store", "")  # no user@ in the label
    assert await stored_multiset(settings) == expected(good)


async def test_seconds_since_last_commit_grows_while_nothing_is_written(
    new_settings: Callable[..., Settings], registry: CollectorRegistry, engines: Callable
) -> None:
    settings = await new_settings()
    async with OrderbookRepository(engines(settings)) as repo:
        metrics.register(repo, registry)
        await repo.add_many(quotes(10))
        await repo.flush(timeout_s=30)
        first = parse(generate_latest(registry).decode())
        await asyncio.sleep(1.2)
        later = parse(generate_latest(registry).decode())
        await repo.add_many(quotes(10, seed=8))
        await repo.flush(timeout_s=30)
        after_commit = parse(generate_latest(registry).decode())
    key = ("seconds_since_last_commit", label(settings))
    assert later[key] - first[key] >= 1.0
    assert after_commit[key] < later[key]


# -- failures: blocked, spooled, replayed ----------------------------------------------------


async def test_blocked_writes_show_and_the_spooled_rows_are_counted_when_replayed(
    new_settings: Callable[..., Settings], served: Callable[..., int], engines: Callable
) -> None:
    settings = await new_settings(migrate=False)  # no table yet: a configuration failure
    added = quotes(800)
    db = label(settings)
    repo = OrderbookRepository(engines(settings))
    try:
        port = served(repo)
        await repo.add_many(added)
        with pytest.raises(WritesBlocked):
            await repo.flush(timeout_s=30)
        text, blocked = await scrape(port)
        assert blocked[("writes_blocked", db)] == 1
        assert blocked[("rows_written_total", db)] == 0
        assert blocked[("retries_total", db)] >= 1
        assert blocked[("rows_pending", db)] + blocked[("rows_in_spool", db)] == 800
        assert SECRET not in text

        migrations.upgrade(settings, "head")  # the fix, while the writer runs
        await repo.flush(timeout_s=30)
        _, fixed = await scrape(port)
    finally:
        await repo.close(timeout_s=10)
    stats = repo.stats()
    assert fixed[("writes_blocked", db)] == 0
    assert fixed[("rows_written_total", db)] == 800
    assert fixed[("rows_pending", db)] == 0
    assert fixed[("rows_in_spool", db)] == 0
    assert fixed[("rows_spooled_total", db)] == stats.rows_spooled > 0
    assert fixed[("rows_replayed_total", db)] == stats.rows_replayed > 0
    assert fixed[("retries_total", db)] == stats.retries
    assert await stored_multiset(settings) == expected(added)


# -- several repositories, the old collector ---------------------------------------------


async def test_two_repositories_on_two_databases_are_both_exported(
    new_settings: Callable[..., Settings], served: Callable[..., int], engines: Callable
) -> None:
    first, second = await new_settings(), await new_settings()
    async with (
        OrderbookRepository(engines(first)) as repo_a,
        OrderbookRepository(engines(second)) as repo_b,
    ):
        port = served(repo_a, repo_b)
        await repo_a.add_many(quotes(30))
        await repo_b.add_many(quotes(70, seed=9))
        await repo_a.flush(timeout_s=30)
        await repo_b.flush(timeout_s=30)
        text, samples = await scrape(port)
    assert samples[("rows_written_total", label(first))] == 30
    assert samples[("rows_written_total", label(second))] == 70
    assert label(first) != label(second)
    assert SECRET not in text


async def test_two_repositories_on_one_database_need_distinct_labels(
    new_settings: Callable[..., Settings], registry: CollectorRegistry, engines: Callable
) -> None:
    settings = await new_settings()
    engine = engines(settings)
    async with (
        OrderbookRepository(engine, spool_dir=settings.spool_dir / "a") as repo_a,
        OrderbookRepository(engine, spool_dir=settings.spool_dir / "b") as repo_b,
    ):
        metrics.register(repo_a, registry)
        metrics.register(repo_a, registry)  # again: nothing changes
        with pytest.raises(InvalidArgument, match="database="):
            metrics.register(repo_b, registry)
        metrics.register(repo_b, registry, database="second-writer")
        await repo_b.add_many(quotes(5))
        await repo_b.flush(timeout_s=30)
        samples = parse(generate_latest(registry).decode())
        assert samples[("rows_written_total", "second-writer")] == 5
        assert samples[("rows_written_total", label(settings))] == 0

        metrics.unregister(repo_b, registry)
        samples = parse(generate_latest(registry).decode())
        assert ("rows_written_total", "second-writer") not in samples


async def test_a_repository_that_is_gone_leaves_the_exposition(
    new_settings: Callable[..., Settings], registry: CollectorRegistry, engines: Callable
) -> None:
    settings = await new_settings()
    repo = OrderbookRepository(engines(settings))
    metrics.register(repo, registry)
    await repo.add_many(quotes(3))
    await repo.close(timeout_s=10)
    assert ("rows_written_total", label(settings)) in parse(generate_latest(registry).decode())
    del repo
    gc.collect()
    assert ("rows_written_total", label(settings)) not in parse(generate_latest(registry).decode())


async def test_the_old_collectors_postgresql_manager_is_exported_once_connected(
    new_settings: Callable[..., Settings], registry: CollectorRegistry
) -> None:
    settings = await new_settings()
    config = {
        "storage": {"type": "postgresql"},
        "postgresql": {
            "host": settings.host,
            "port": settings.port,
            "database": settings.name,
            "user": settings.user,
            "password": SECRET,
            "sslmode": "disable",
        },
    }
    manager = DataManager(config)
    with pytest.raises(InvalidArgument, match="after connect"):
        metrics.register(manager, registry)
    await manager.connect()
    try:
        metrics.register(manager, registry)
        records = quotes(25)
        for record in records:
            assert await manager.save_record(record)
        assert not await manager.save_record({**records[0], "ask_price": "abc"})
        assert manager.storage.repository is not None
        await manager.storage.repository.flush(timeout_s=30)
        text = generate_latest(registry).decode()
    finally:
        await manager.shutdown()
    samples = parse(text)
    db = label(settings)
    assert samples[("rows_added_total", db)] == 25
    assert samples[("rows_written_total", db)] == 25
    assert samples[("rows_rejected_total", db)] == 1
    assert SECRET not in text


def test_things_without_a_database_writer_are_refused_by_name(
    tmp_path: Path, settings: Settings
) -> None:
    files = DataManager({"storage": {"type": "file"}, "file": {"base_dir": str(tmp_path)}})
    with pytest.raises(InvalidArgument, match=r"storage\.type='file'"):
        metrics.register(files, CollectorRegistry())
    with (
        orderbook_store.connect(settings) as store,
        pytest.raises(InvalidArgument, match="OrderbookStore: it has no buffered writer"),
    ):
        metrics.register(store, CollectorRegistry())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="cannot export a str"):
        metrics.register("postgresql://x", CollectorRegistry())  # type: ignore[arg-type]


# -- serving ---------------------------------------------------------------------------------


def test_serve_names_a_bad_port_and_an_address_in_use(registry: CollectorRegistry) -> None:
    with pytest.raises(InvalidArgument, match="port=70000"):
        metrics.serve(port=70000, registry=registry)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            metrics.serve(port=port, addr="127.0.0.1", registry=registry)


@pytest.mark.slow
async def test_scrapes_during_a_heavy_write_never_fail_and_counters_never_go_down(
    new_settings: Callable[..., Settings], served: Callable[..., int], engines: Callable
) -> None:
    settings = await new_settings()
    db = label(settings)
    seen: list[Scrape] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    async with OrderbookRepository(engines(settings), batch_size=2_000) as repo:
        port = served(repo)

        def scraper() -> None:
            while not stop.is_set():
                try:
                    seen.append(parse(fetch(port)))
                except BaseException as exc:
                    errors.append(exc)
                    return

        thread = threading.Thread(target=scraper)
        thread.start()
        try:
            feed = quotes(150_000, seed=11)
            for number, quote in enumerate(feed):
                await repo.add(quote)
                if number % 5_000 == 0:
                    await asyncio.sleep(0)
            await repo.flush(timeout_s=60)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)
        _, last = await scrape(port)
    assert not errors
    assert len(seen) >= 5
    for name in ("rows_added_total", "rows_written_total", "batches_total"):
        values = [s[(name, db)] for s in [*seen, last]]
        assert values == sorted(values), name
    assert last[("rows_added_total", db)] == last[("rows_written_total", db)] == 150_000


def test_without_prometheus_client_the_import_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "try:\n"
        "    import orderbook_store.metrics\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'orderbook_store[metrics]'" in result.stdout
