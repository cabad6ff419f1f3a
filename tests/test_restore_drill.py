"""The restore drill of docs/deploy-digitalocean.md, done for real on a local server.

A database at head holds the real tardis.dev file (imported) and collector rows (written by
the buffered writer). ``pg_dump -Fc`` of it is restored with ``pg_restore`` into a new
database, and then:

* ``orderbook-store verify <file>`` against the restored database exits 0 (same count, first
  and last timestamp and value checksum per symbol);
* the whole table (ids, every column, ``created_at``) is identical: count and an MD5 of the
  rows in id order, computed by both servers;
* the migration state, the partitions and the id sequence came along: the restored database
  is at head and the next row gets a new id;
* one closed partition (detached, then ``pg_dump --table``) restores into a database at head
  and, attached again with its range, holds the same rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner

from orderbook_store.cli import app as cli_app
from orderbook_store.engine import create_engine
from orderbook_store.files.importers.pipeline import import_paths
from orderbook_store.files.importers.verify import verify_paths
from orderbook_store.ops import migrations, partitions
from orderbook_store.repository import OrderbookRepository
from orderbook_store.synthetic import QuoteWalk

from pgserver import TemporaryPostgres

pytestmark = pytest.mark.fault

TABLE_DIGEST = """
SELECT count(*) AS rows,
       md5(string_agg(t::text, E'\\n' ORDER BY t.id)) AS digest
FROM orderbook_data t
"""


@pytest.fixture(scope="module")
def server() -> Iterator[TemporaryPostgres]:
    with TemporaryPostgres() as pg:
        yield pg


async def _fetch(url: str, sql: str) -> asyncpg.Record:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(sql)
        assert row is not None
        return row
    finally:
        await conn.close()


async def _partitions(url: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'orderbook_data'::regclass ORDER BY 1"
        )
        return [(r["relname"], r["bound"]) for r in rows]
    finally:
        await conn.close()


async def test_dump_restore_verify(
    server: TemporaryPostgres, real_quotes_path: Path, tmp_path: Path
) -> None:
    server.create_database("live")
    live = server.settings("live", spool_dir=tmp_path / "spool")
    await asyncio.to_thread(migrations.upgrade, live, "head")
    engine = create_engine(live)
    try:
        summary = await import_paths(engine, [real_quotes_path], quarantine=tmp_path / "q.csv")
        assert summary.files[0].rows == 9_999
        async with OrderbookRepository(engine) as repo:
            await repo.add_many(QuoteWalk(["ETHUSDT", "SOLUSDT"], seed=8).take(2_000))
            await repo.flush(timeout_s=60)
    finally:
        await engine.dispose()

    dump = server.root / "live.dump"
    server._run(
        server._bin("pg_dump"),
        "-h",
        "127.0.0.1",
        "-p",
        str(server.port),
        "-U",
        "postgres",
        "-Fc",
        "-f",
        str(dump),
        "live",
    )
    server.create_database("restored")
    server._run(
        server._bin("pg_restore"),
        "-h",
        "127.0.0.1",
        "-p",
        str(server.port),
        "-U",
        "postgres",
        "-d",
        "restored",
        "--exit-on-error",
        str(dump),
    )
    restored = server.settings("restored")

    # orderbook-store verify, as an operator runs it
    result = await asyncio.to_thread(
        CliRunner().invoke,
        cli_app,
        ["verify", str(real_quotes_path)],
        env={"DATABASE_URL": server.url("restored")},
    )
    assert result.exit_code == 0, result.output
    engine = create_engine(restored)
    try:
        verdict = await verify_paths(engine, [real_quotes_path])
    finally:
        await engine.dispose()
    assert [f.status for f in verdict.files] == ["ok"]

    # every row, every column, identical
    before = await _fetch(server.url("live"), TABLE_DIGEST)
    after = await _fetch(server.url("restored"), TABLE_DIGEST)
    assert before["rows"] == 11_999
    assert (after["rows"], after["digest"]) == (before["rows"], before["digest"])

    # schema state came along
    assert await _partitions(server.url("restored")) == await _partitions(server.url("live"))
    version = await _fetch(server.url("restored"), "SELECT version_num FROM alembic_version")
    assert version["version_num"] == migrations.head_revision()
    engine = create_engine(restored)
    try:
        await OrderbookRepository(engine).insert_many(QuoteWalk(["BTCUSDT"], seed=99).take(1))
    finally:
        await engine.dispose()
    ids = await _fetch(
        server.url("restored"),
        "SELECT max(id) AS newest, count(DISTINCT id) AS distinct_ids FROM orderbook_data",
    )
    assert ids["distinct_ids"] == 12_000
    assert (
        ids["newest"]
        > (await _fetch(server.url("live"), "SELECT max(id) AS m FROM orderbook_data"))["m"]
    )


async def test_a_closed_partition_dumped_alone_restores_its_rows(
    server: TemporaryPostgres, tmp_path: Path
) -> None:
    # The real file's day (2020-02-22) gets its own partition, which is then closed: detached
    # from the table, dumped alone (what the deploy guide does before dropping it).
    engine = create_engine(server.settings("live"))
    try:
        await partitions.ensure(engine, 1)
    finally:
        await engine.dispose()
    bounds = dict(await _partitions(server.url("live")))
    row = await _fetch(
        server.url("live"),
        "SELECT tableoid::regclass::text AS part, count(*) AS rows, "
        "md5(string_agg(t::text, E'\\n' ORDER BY id)) AS digest "
        "FROM orderbook_data t WHERE timestamp < 1600000000000000 GROUP BY 1",
    )
    assert row["rows"] == 9_999
    assert row["part"] != "orderbook_data_default"
    server.psql(f"ALTER TABLE orderbook_data DETACH PARTITION {row['part']}", dbname="live")
    partition = row["part"]
    dump = server.root / f"{partition}.sql"
    server._run(
        server._bin("pg_dump"),
        "-h",
        "127.0.0.1",
        "-p",
        str(server.port),
        "-U",
        "postgres",
        "--table",
        partition,
        "-f",
        str(dump),
        "live",
    )
    # Restored where it belongs: a database at head (it has the table, the id sequence), then
    # attached again with the range it had.
    server.create_database("archive_check")
    await asyncio.to_thread(migrations.upgrade, server.settings("archive_check"), "head")
    server._run(
        server._bin("psql"),
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-p",
        str(server.port),
        "-U",
        "postgres",
        "-d",
        "archive_check",
        "-f",
        str(dump),
    )
    server.psql(
        f"ALTER TABLE orderbook_data ATTACH PARTITION {partition} {bounds[partition]}",
        dbname="archive_check",
    )
    server.psql(
        f"INSERT INTO orderbook_symbols SELECT DISTINCT symbol FROM {partition} "
        "ON CONFLICT DO NOTHING",
        dbname="archive_check",
    )
    listed = await _fetch(
        server.url("archive_check"),
        "SELECT (SELECT array_agg(symbol ORDER BY symbol) FROM orderbook_symbols) AS listed, "
        "(SELECT array_agg(DISTINCT symbol ORDER BY symbol) FROM orderbook_data) AS stored",
    )
    assert listed["listed"] == listed["stored"] and listed["listed"]
    restored = await _fetch(
        server.url("archive_check"),
        "SELECT count(*) AS rows, md5(string_agg(t::text, E'\\n' ORDER BY id)) AS digest "
        "FROM orderbook_data t WHERE timestamp < 1600000000000000",
    )
    assert (restored["rows"], restored["digest"]) == (row["rows"], row["digest"])
