"""Reads on a real streaming replica; writes and migrations on the primary; fallback with a log.

The replica is made the way a read-only node is: ``pg_basebackup -R`` from a running primary
(``wal_level = replica``), started on its own port, streaming.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text

from orderbook_store.engine import create_engine, create_read_engine
from orderbook_store.ops import migrations
from orderbook_store.ops.doctor import run_checks
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk

from pgserver import TemporaryPostgres, free_port

pytestmark = pytest.mark.fault

DB = "orderbook"
WHERE_AM_I = "SELECT pg_is_in_recovery() AS replica, inet_server_port() AS port"


class StreamingReplica:
    """A hot standby of ``primary`` made by ``pg_basebackup -R``, on its own port."""

    def __init__(self, primary: TemporaryPostgres) -> None:
        self.primary = primary
        self.port = free_port()
        self.datadir = primary.root / "replica"
        self.logfile = primary.root / "replica.log"

    def start(self) -> None:
        p = self.primary
        p._run(
            p._bin("pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            str(p.port),
            "-U",
            "postgres",
            "-D",
            str(self.datadir),
            "-R",
            "-X",
            "stream",
            "--no-sync",
            "--checkpoint=fast",  # a spread checkpoint would take minutes
        )
        with open(self.datadir / "postgresql.conf", "a") as fh:
            # Copied from the primary: only the port differs (sockets are named by port).
            fh.write(f"port = {self.port}\nhot_standby = on\n")
        p._run(p._bin("pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-w", "start")

    def stop(self) -> None:
        p = self.primary
        if self.datadir.exists():
            p._run(
                p._bin("pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop", check=False
            )

    def url(self, dbname: str = DB) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}?sslmode=disable"


class Cluster:
    def __init__(self, primary: TemporaryPostgres, replica: StreamingReplica) -> None:
        self.primary = primary
        self.replica = replica

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {"read_url": self.replica.url(), "pool_size": 2, **overrides}
        return self.primary.settings(DB, **values)

    async def caught_up(self) -> None:
        """Wait until the replica has replayed everything the primary has written so far."""
        primary = await asyncpg.connect(self.primary.url(DB))
        replica = await asyncpg.connect(self.replica.url())
        try:
            target = await primary.fetchval("SELECT pg_current_wal_lsn()::text")
            for _ in range(600):
                if await replica.fetchval(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", target
                ):
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the replica did not catch up within 30 s")
        finally:
            await primary.close()
            await replica.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with TemporaryPostgres(
        extra_conf={"wal_level": "replica", "max_wal_senders": "4", "hot_standby": "on"}
    ) as primary:
        primary.create_database(DB)
        replica = StreamingReplica(primary)
        try:
            replica.start()
            yield Cluster(primary, replica)
        finally:
            replica.stop()


async def where(engine_settings: Settings, *, read: bool) -> tuple[bool, int]:
    engine = create_read_engine(engine_settings) if read else create_engine(engine_settings)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(text(WHERE_AM_I))).one()
    finally:
        await engine.dispose()
    return bool(row.replica), int(row.port)


async def sessions_of_package(server: object) -> int:
    """Sessions the package holds open on ``server`` (by its application_name)."""
    conn = await asyncpg.connect(server.url())  # type: ignore[attr-defined]
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'orderbook_store' AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


async def test_migrations_and_writes_go_to_the_primary_reads_to_the_replica(
    cluster: Cluster, tmp_path: Path
) -> None:
    settings = cluster.settings(spool_dir=tmp_path)
    migrations.upgrade(settings, "head")  # DDL: would fail on the read-only node

    assert await where(settings, read=False) == (False, cluster.primary.port)
    assert await where(settings, read=True) == (True, cluster.replica.port)

    quotes = QuoteWalk(["BTCUSDT"], seed=11).take(400)
    engine = create_engine(settings)
    try:
        async with OrderbookRepository(engine) as repo:
            await repo.add_many(quotes)
            await repo.flush(timeout_s=60)
            await cluster.caught_up()
            frame = await repo.quotes(
                "BTCUSDT", quotes[0]["timestamp"], quotes[-1]["timestamp"] + 1
            )
            assert len(frame) == 400
            # the read's pooled connection is on the read node, the writer's on the primary
            assert await sessions_of_package(cluster.replica) >= 1
        assert await sessions_of_package(cluster.replica) == 0  # closed with the repository
    finally:
        await engine.dispose()
    replica_version = await asyncpg.connect(cluster.replica.url())
    try:
        assert (
            await replica_version.fetchval("SELECT version_num FROM alembic_version")
            == migrations.head_revision()
        )
    finally:
        await replica_version.close()


async def test_an_absent_read_node_falls_back_to_the_primary_with_a_log_line(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/{DB}?sslmode=disable"
    settings = cluster.settings(read_url=nowhere, connect_timeout_s=5)
    with caplog.at_level(logging.WARNING, logger="orderbook_store.engine"):
        assert await where(settings, read=True) == (False, cluster.primary.port)
    assert any(
        "read node unavailable, reading from the primary" in r.getMessage() for r in caplog.records
    )


@pytest.fixture
def replay_paused(cluster: Cluster) -> Iterator[None]:
    async def set_paused(paused: bool) -> None:
        conn = await asyncpg.connect(cluster.replica.url())
        try:
            fn = "pg_wal_replay_pause" if paused else "pg_wal_replay_resume"
            await conn.execute(f"SELECT {fn}()")
        finally:
            await conn.close()

    asyncio.run(set_paused(True))
    try:
        yield
    finally:
        asyncio.run(set_paused(False))


async def test_a_lagging_read_node_falls_back_to_the_primary_with_a_log_line(
    cluster: Cluster, replay_paused: None, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # The primary writes; the replica receives the WAL but does not replay it: real lag.
    engine = create_engine(cluster.settings())
    try:
        await OrderbookRepository(engine).insert_many(QuoteWalk(["ETHUSDT"], seed=2).take(10))
    finally:
        await engine.dispose()
    replica = await asyncpg.connect(cluster.replica.url())
    try:
        for _ in range(600):
            if await replica.fetchval(
                "SELECT pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()"
            ):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the replica never received the primary's WAL")
    finally:
        await replica.close()

    lenient = cluster.settings(read_max_lag_s=3600)
    assert await where(lenient, read=True) == (True, cluster.replica.port)

    strict = cluster.settings(read_max_lag_s=0.001, spool_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="orderbook_store.engine"):
        assert await where(strict, read=True) == (False, cluster.primary.port)
    lines = [r.getMessage() for r in caplog.records]
    assert any("behind" in line and "reading from the primary" in line for line in lines), lines

    report = await run_checks(strict)
    assert report.check("read node").status == "warn"
    assert "lagging" in report.check("read node").value


async def test_doctor_reports_a_healthy_read_node(cluster: Cluster, tmp_path: Path) -> None:
    await cluster.caught_up()
    report = await run_checks(cluster.settings(spool_dir=tmp_path))
    assert report.check("read node").status == "ok", report.as_dict()
    assert report.check("server").status == "ok"
