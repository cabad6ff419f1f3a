"""Several collector processes writing to one table at once, sharing one spool directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from orderbook_store.settings import Settings
from orderbook_store.synthetic import QuoteWalk

from stored import expected, stored_multiset

pytestmark = pytest.mark.slow

PROCESSES = 4
QUOTES_EACH = 20_000

_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from orderbook_store import OrderbookRepository, Settings, create_engine
    from orderbook_store.synthetic import QuoteWalk

    async def main(spool, seed, count):
        engine = create_engine(Settings(pool_size=2))  # DATABASE_URL from the environment
        async with OrderbookRepository(engine, spool_dir=spool, batch_size=500) as repo:
            for i, quote in enumerate(QuoteWalk(seed=seed).take(count)):
                await repo.add(quote)
                if i % 1000 == 0:
                    await asyncio.sleep(0.001)  # a collector waits for its websocket
        print(json.dumps(repo.stats().as_dict()), flush=True)
        await engine.dispose()

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    """
)


async def test_four_processes_writing_at_once_store_exactly_the_union(
    engine: AsyncEngine, settings: Settings, tmp_path: Path
) -> None:
    assert settings.database_url is not None
    # The URL (password included) goes through the environment, never the command line.
    env = {**os.environ, "DATABASE_URL": settings.database_url.get_secret_value()}
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(tmp_path),  # one spool directory shared by all of them
                str(100 + n),
                str(QUOTES_EACH),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in range(PROCESSES)
    ]
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
        stats = json.loads(out)
        assert stats["rows_added"] == stats["rows_written"] == QUOTES_EACH
        assert stats["rows_in_spool"] == 0

    added = [q for n in range(PROCESSES) for q in QuoteWalk(seed=100 + n).take(QUOTES_EACH)]
    stored = await stored_multiset(settings)
    conn = await asyncpg.connect(**settings.asyncpg_connect_kwargs())
    try:
        ledger_rows = await conn.fetchval("SELECT sum(rows) FROM orderbook_write_batches")
    finally:
        await conn.close()
    assert sum(stored.values()) == PROCESSES * QUOTES_EACH
    assert stored == expected(added)
    assert ledger_rows == PROCESSES * QUOTES_EACH
    assert not list(tmp_path.glob("*/*/*.seg"))  # nothing left behind in the shared spool
