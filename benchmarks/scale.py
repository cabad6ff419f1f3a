"""Scale benchmark: a legacy table of ``--rows`` quotes (default 30,000,000) carried from the
original DDL through ``upgrade head`` and ``partitions compact``, measured after each step.

1. **plain table**: 20 symbols x 30 days from 2024-01-01, interleaved in time as a collector
   writes them, made by the server with ``generate_series`` into the original DDL (revision
   0001's table, its indexes present while rows go in), ``VACUUM ANALYZE``, then
   ``orderbook-store stamp 0001``: a database made by hand and adopted;
2. **upgraded**: ``orderbook-store upgrade`` (to head), run while a probe writer inserts one row
   every 20 ms on its own connection: the longest an insert waited is the upgrade's stall;
3. **compacted**: ``orderbook-store partitions compact``, probed the same way (when the command
   exists; otherwise the benchmark says so and stops measuring there).

After each step: one symbol's 30 days via ``quotes()`` (rows/s, best of ``--repeat``) and the
table and index blocks that read touches per 1,000 rows (``EXPLAIN (ANALYZE, BUFFERS)`` of the
reader's own query); one symbol's day; ``latest()`` of every symbol; ``asof()`` of 100 times
in one day (each best of ``--repeat``, in ms); bytes per row (heap, TOAST and indexes of every
partition); and a check that every row and id is kept (count and sum of ids, the probe
writer's rows counted apart). Every figure is printed with its ratio to the plain table's
(value / plain value); the stalls with their ratio to the probe writer's longest wait on the
idle plain table.

The server is the one the settings name (``DATABASE_URL`` or ``DB_HOST``, from the environment
or ``.env``), else the local 127.0.0.1:5432. The benchmark creates its own database there and
drops it at the end, also after a failure or Ctrl-C. Disk: about 400 bytes a row at the peak
(the plain table ~240, the upgrade's ``(id, timestamp)`` key ~30, compaction's sorted copy of a
partition until it replaces the original, and WAL), so about 12 GB at 30M rows; on a local
server the free space is checked first. At 30M rows it runs for some minutes.

    python -m benchmarks.scale [--rows 30000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from benchmarks._common import admin_execute  # noqa: F401  (puts tests/ on the path)
from orderbook_store.engine import create_engine
from orderbook_store.read.plan import _BIND_SQL, plan_quotes
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings

from catalog import ORIGINAL_DDL

#: ``python -m benchmarks`` (``make bench``) leaves this one out: it is ``make bench-scale``.
RUN_WITH_THE_OTHERS = False

SYMBOLS = (
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "ADAUSDT", "AVAXUSDT",
    "LINKUSDT", "DOTUSDT", "MATICUSDT", "LTCUSDT", "TRXUSDT", "ATOMUSDT", "NEARUSDT",
    "APTUSDT", "ARBUSDT", "OPUSDT", "FILUSDT", "SUIUSDT",
)  # fmt: skip
START = dt.date(2024, 1, 1)
DAYS = 30
DAY_US = 86_400_000_000
T0 = (START - dt.date(1970, 1, 1)).days * DAY_US
READ_SYMBOL = "ETHUSDT"
PROBE_EXCHANGE = "scale-probe"
PROBE_INTERVAL_S = 0.020
BYTES_PER_ROW_AT_PEAK = 400

#: Rows ``lo`` .. ``hi - 1`` of the fill: symbols in turn, time rising with the row number;
#: created_at a few ms after the exchange's time, as a collector stamps rows it receives.
FILL_SQL = """
INSERT INTO orderbook_data
    (symbol, timestamp, local_timestamp, ask_amount, ask_price, bid_price, bid_amount, created_at)
SELECT (ARRAY[{symbols}])[1 + g % {count}],
       {t0} + g * {step},
       {t0} + g * {step} + 1500 + g % 997,
       round((random() * 10)::numeric, 3),
       round((40000 + random() * 100)::numeric, 1),
       round((39990 + random() * 100)::numeric, 1),
       round((random() * 50)::numeric, 3),
       'epoch'::timestamp + ({t0} + g * {step} + 4000) * interval '1 microsecond'
FROM generate_series({lo}::bigint, {hi}::bigint - 1) AS g
"""

PROBE_SQL = (
    "INSERT INTO orderbook_data (exchange, symbol, timestamp, local_timestamp,"
    " ask_amount, ask_price, bid_price, bid_amount)"
    " VALUES ($1, $2, $3::bigint, $3::bigint + 1000, 1, 40000.1, 40000.0, 1) RETURNING id"
)

KEPT_SQL = f"""
SELECT count(*) FILTER (WHERE exchange <> '{PROBE_EXCHANGE}') AS rows,
       coalesce(sum(id) FILTER (WHERE exchange <> '{PROBE_EXCHANGE}'), 0) AS ids,
       count(*) FILTER (WHERE exchange = '{PROBE_EXCHANGE}') AS probe_rows,
       coalesce(sum(id) FILTER (WHERE exchange = '{PROBE_EXCHANGE}'), 0) AS probe_ids
FROM orderbook_data
"""

#: Heap, TOAST and indexes of the plain table, or of every partition.
SIZE_SQL = """
SELECT CASE WHEN c.relkind = 'p'
            THEN (SELECT coalesce(sum(pg_total_relation_size(t.relid)), 0)
                  FROM pg_partition_tree(c.oid) t WHERE t.isleaf)
            ELSE pg_total_relation_size(c.oid) END
FROM pg_class c WHERE c.oid = 'orderbook_data'::regclass
"""


# -- where: the server, a database of our own, the commands' environment -------------------


def server_settings() -> tuple[Settings, str]:
    """The configured server (as the demo decides), else the local 5432."""
    configured = Settings()
    if {"host", "database_url"} & configured.model_fields_set:
        return configured, configured.describe()
    local = "postgresql://postgres@127.0.0.1:5432/postgres?sslmode=disable"
    return Settings(database_url=local), "127.0.0.1:5432"


def command_env(settings: Settings) -> dict[str, str]:
    """The environment for ``orderbook-store`` commands on ``settings``' database (DB_*
    variables; a ``DATABASE_URL`` from the environment or ``.env`` is blanked out)."""
    env = dict(os.environ, DATABASE_URL="")
    env |= {
        "DB_HOST": settings.host,
        "DB_PORT": str(settings.port),
        "DB_NAME": settings.name,
        "DB_USER": settings.user,
        "DB_SSLMODE": settings.sslmode,
    }
    if settings.password is not None:
        env["DB_PASSWORD"] = settings.password.get_secret_value()
    if settings.sslrootcert is not None:
        env["DB_SSLROOTCERT"] = str(settings.sslrootcert)
    return env


async def connect(settings: Settings) -> asyncpg.Connection:
    kwargs = settings.asyncpg_connect_kwargs()
    kwargs["statement_cache_size"] = 0
    return await asyncpg.connect(**kwargs)


@contextlib.contextmanager
def own_database(server: Settings) -> Iterator[Settings]:
    """Settings for a new database on ``server``, dropped on exit (failure and Ctrl-C too)."""
    name = f"obs_scale_{os.getpid()}_{secrets.token_hex(3)}"

    async def admin(sql: str) -> None:
        conn = await connect(server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield server.model_copy(update={"name": name})
    finally:
        with _no_interrupts():
            asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            print(f"dropped the database {name}")


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while the block runs (the database is being dropped)."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _terminate_as_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


async def free_disk_bytes(settings: Settings) -> int | None:
    """Free bytes under the server's data directory, when the server runs on this machine."""
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.host.startswith("/"):
        return None
    conn = await connect(settings)
    try:
        directory = await conn.fetchval("SHOW data_directory")
    except asyncpg.PostgresError:
        return None
    finally:
        await conn.close()
    return shutil.disk_usage(directory).free if Path(directory).is_dir() else None


# -- the steps -----------------------------------------------------------------------------


async def build_legacy_table(settings: Settings, rows: int) -> None:
    """The original DDL, filled by the server a day at a time, then ``VACUUM ANALYZE``."""
    step = DAYS * DAY_US // rows
    symbols = ", ".join(f"'{s}'" for s in SYMBOLS)
    conn = await connect(settings)
    try:
        await conn.execute(ORIGINAL_DDL)
        started = time.perf_counter()
        per_day = -(-rows // DAYS)
        for day in range(DAYS):
            lo, hi = day * per_day, min(rows, (day + 1) * per_day)
            if lo < hi:
                await conn.execute(
                    FILL_SQL.format(
                        symbols=symbols, count=len(SYMBOLS), t0=T0, step=step, lo=lo, hi=hi
                    )
                )
            if day % 5 == 4:
                print(f"  ... {hi:,} rows in {time.perf_counter() - started:.0f} s", flush=True)
        filled = time.perf_counter() - started
        started = time.perf_counter()
        await conn.execute("VACUUM ANALYZE orderbook_data")
        print(
            f"  filled in {filled:.0f} s, VACUUM ANALYZE in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    finally:
        await conn.close()


@dataclass
class Probe:
    """One row every 20 ms on a connection of its own: how long each insert took, and the
    rows and ids it wrote. Also samples the database's size every second (its peak)."""

    settings: Settings
    longest_s: float = 0.0
    inserts: int = 0
    ids: int = 0
    failures: list[str] = field(default_factory=list)
    peak_bytes: int = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Probe]:
        """Insert every 20 ms until the block ends."""
        stop = asyncio.Event()
        conn = await connect(self.settings)
        sizes = await connect(self.settings)
        tasks = [
            asyncio.ensure_future(self._loop(conn, stop)),
            asyncio.ensure_future(self._watch_size(sizes, stop)),
        ]
        try:
            yield self
            await asyncio.sleep(0.2)  # an insert queued behind the step's last lock ends too
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await conn.close()
            await sizes.close()

    async def _watch_size(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        while not stop.is_set():
            size = await conn.fetchval("SELECT pg_database_size(current_database())")
            self.peak_bytes = max(self.peak_bytes, int(size))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def _loop(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        tick = time.perf_counter()
        while not stop.is_set():
            started = time.perf_counter()
            now_us = int(time.time() * 1_000_000)
            try:
                self.ids += int(await conn.fetchval(PROBE_SQL, PROBE_EXCHANGE, SYMBOLS[0], now_us))
                self.inserts += 1
            except asyncpg.PostgresError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self.longest_s = max(self.longest_s, time.perf_counter() - started)
            tick = max(tick + PROBE_INTERVAL_S, time.perf_counter())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), tick - time.perf_counter())


async def run_command(settings: Settings, *args: str) -> tuple[int, str, float]:
    """``orderbook-store ARGS`` on ``settings``' database: exit code, output, seconds."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orderbook_store",
        *args,
        env=command_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace"), time.perf_counter() - started


async def step_with_probe(settings: Settings, probe: Probe, *args: str) -> tuple[int, str, float]:
    """Run a command while the probe writer inserts; the probe's longest wait is this step's."""
    probe.longest_s = 0.0
    async with probe.running():
        return await run_command(settings, *args)


# -- the measurements ----------------------------------------------------------------------


@dataclass
class Figures:
    """What one state of the table measures (seconds, blocks, bytes)."""

    range_rows: int
    range_s: float
    blocks_per_1000: float
    day_s: float
    latest_s: float
    asof_s: float
    bytes_per_row: float
    kept: tuple[int, int, int, int]  # rows, sum of ids, probe rows, sum of probe ids
    database_bytes: int


async def best_of(repeat: int, work: Callable[[], Awaitable[object]]) -> float:
    await work()  # warm: the cache, the pool, the statement caches
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        await work()
        best = min(best, time.perf_counter() - started)
    return best


async def blocks_per_1000_rows(settings: Settings, start_us: int, end_us: int) -> float:
    """Shared buffers the reader's query touches (hit or read) per 1,000 rows it returns."""
    plan = plan_quotes(READ_SYMBOL, start_us, end_us)
    conn = await connect(settings)
    try:
        async with conn.transaction(readonly=True):
            await conn.fetchval(_BIND_SQL, *plan.bind_args(READ_SYMBOL))
            explained = await conn.fetchval(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + plan.copy_sql(order_by_id=False)
            )
    finally:
        await conn.close()
    top = json.loads(explained)[0]["Plan"]
    blocks = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
    return float(blocks * 1000 / max(1, top["Actual Rows"]))


async def measure(settings: Settings, repeat: int) -> Figures:
    engine = create_engine(settings.model_copy(update={"pool_size": 4}))
    start, end = T0, T0 + DAYS * DAY_US
    day = (T0 + 14 * DAY_US, T0 + 15 * DAY_US)
    times = [day[0] + i * (DAY_US // 100) + 12_345 for i in range(100)]
    range_rows = 0
    try:
        async with OrderbookRepository(engine) as repo:

            async def whole_range() -> None:
                nonlocal range_rows
                range_rows = len(await repo.quotes(READ_SYMBOL, start, end))

            range_s = await best_of(repeat, whole_range)
            day_s = await best_of(repeat, lambda: repo.quotes(READ_SYMBOL, *day))
            latest_s = await best_of(repeat, repo.latest)
            asof_s = await best_of(repeat, lambda: repo.asof(READ_SYMBOL, times))
    finally:
        await engine.dispose()
    blocks = await blocks_per_1000_rows(settings, start, end)
    conn = await connect(settings)
    try:
        kept_row = await conn.fetchrow(KEPT_SQL)
        size = int(await conn.fetchval(SIZE_SQL))
        database_bytes = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
    finally:
        await conn.close()
    kept = (kept_row["rows"], kept_row["ids"], kept_row["probe_rows"], kept_row["probe_ids"])
    return Figures(
        range_rows=range_rows,
        range_s=range_s,
        blocks_per_1000=blocks,
        day_s=day_s,
        latest_s=latest_s,
        asof_s=asof_s,
        bytes_per_row=size / max(1, kept[0] + kept[2]),
        kept=kept,
        database_bytes=database_bytes,
    )


# -- the report ----------------------------------------------------------------------------


def _ratio(value: float, plain: float | None) -> str:
    if plain is None:
        return "   (the baseline)"
    return f"{value / plain:8.2f}x plain" if plain else "     (plain: 0)"


def _line(label: str, shown: str, value: float, plain: float | None) -> None:
    print(f"  {label:<54} {shown:>18} {_ratio(value, plain)}", flush=True)


def report(title: str, figures: Figures, plain: Figures | None, probe: Probe) -> bool:
    """Print one state's figures with their ratios to the plain table's; whether every row
    and id is kept."""
    print(title, flush=True)
    base = plain or figures
    rate = figures.range_rows / figures.range_s
    _line(
        f"one symbol, {DAYS} days via quotes() ({figures.range_rows:,} rows)",
        f"{rate:,.0f} rows/s",
        rate,
        None if plain is None else plain.range_rows / plain.range_s,
    )
    _line(
        "  table and index blocks touched per 1,000 rows",
        f"{figures.blocks_per_1000:,.1f}",
        figures.blocks_per_1000,
        None if plain is None else plain.blocks_per_1000,
    )
    for label, attr in (
        ("one symbol, one day", "day_s"),
        (f"latest() over all {len(SYMBOLS)} symbols", "latest_s"),
        ("asof(), 100 times in one day", "asof_s"),
    ):
        value = getattr(figures, attr)
        _line(
            label, f"{value * 1000:,.1f} ms", value, None if plain is None else getattr(plain, attr)
        )
    _line(
        "bytes per row (heap + indexes)",
        f"{figures.bytes_per_row:,.1f}",
        figures.bytes_per_row,
        None if plain is None else plain.bytes_per_row,
    )
    rows, ids, probe_rows, probe_ids = figures.kept
    kept = (rows, ids) == base.kept[:2] and (probe_rows, probe_ids) == (probe.inserts, probe.ids)
    verdict = "yes" if kept else "NO"
    print(
        f"  every row and id kept (count and sum of ids): {verdict}: {rows:,} rows"
        f" (plain: {base.kept[0]:,}), {probe_rows:,} probe rows (inserted: {probe.inserts:,})",
        flush=True,
    )
    return kept


def report_step(
    label: str, code: int, output: str, seconds: float, probe: Probe, idle_s: float
) -> None:
    tail = " ".join(output.strip().splitlines()[-1:]) if output.strip() else ""
    outcome = "done" if code == 0 else f"FAILED (exit {code}): {tail}"
    print(
        f"{label}: {outcome} in {seconds:.1f} s; the writer's longest insert"
        f" {probe.longest_s:.3f} s ({probe.longest_s / idle_s:,.1f}x its longest on the idle"
        f" plain table, {idle_s:.3f} s)",
        flush=True,
    )
    if probe.failures:
        print(f"  {len(probe.failures)} probe inserts FAILED, the first: {probe.failures[0]}")
    probe.failures.clear()


# -- the run -------------------------------------------------------------------------------


async def run(settings: Settings, rows: int, repeat: int, compaction: bool) -> bool:
    """The steps, each reported as it ends; whether every row and id was kept throughout."""
    print(f"building the legacy table: {rows:,} quotes ...", flush=True)
    await build_legacy_table(settings, rows)
    code, output, _ = await run_command(settings, "stamp", "0001")
    if code != 0:
        raise SystemExit(f"orderbook-store stamp 0001 failed: {output.strip()}")
    probe = Probe(settings)
    async with probe.running():  # its longest insert on the idle table: the stalls' baseline
        await asyncio.sleep(3)
    idle_s = max(probe.longest_s, 1e-6)
    if probe.failures:
        raise SystemExit(f"the probe writer cannot insert: {probe.failures[0]}")
    plain = await measure(settings, repeat)
    kept = report("plain table (revision 0001):", plain, None, probe)
    sizes = [plain.database_bytes]

    code, output, seconds = await step_with_probe(settings, probe, "upgrade")
    report_step(
        "upgrade 0001 -> head, a writer inserting every 20 ms", code, output, seconds, probe, idle_s
    )
    if code != 0:
        return False
    upgraded = await measure(settings, repeat)
    sizes.append(upgraded.database_bytes)
    kept &= report("upgraded (head):", upgraded, plain, probe)

    if not compaction:
        print("compaction: not available (this checkout has no `partitions compact`)")
    else:
        code, output, seconds = await step_with_probe(settings, probe, "partitions", "compact")
        report_step(
            "partitions compact, a writer inserting every 20 ms",
            code,
            output,
            seconds,
            probe,
            idle_s,
        )
        compacted = await measure(settings, repeat)
        sizes.append(compacted.database_bytes)
        kept &= report("compacted:", compacted, plain, probe)
    peak = max(probe.peak_bytes, *sizes)
    print(
        f"database size after each step: {', '.join(f'{s / 2**30:.2f} GB' for s in sizes)};"
        f" at most {peak / 2**30:.2f} GB ({peak / rows:,.0f} bytes a row)",
        flush=True,
    )
    return kept


def compaction_available(settings: Settings) -> bool:
    code, _, _ = asyncio.run(run_command(settings, "partitions", "compact", "--help"))
    return code == 0


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print every figure with its ratio to the plain table's."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if args.rows < len(SYMBOLS) * DAYS:
        parser.error(f"--rows={args.rows}: at least {len(SYMBOLS) * DAYS} (a row per symbol a day)")
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    server, where = server_settings()
    need = args.rows * BYTES_PER_ROW_AT_PEAK
    free = asyncio.run(free_disk_bytes(server))
    print(
        f"scale benchmark on {where}: {args.rows:,} quotes, {len(SYMBOLS)} symbols x {DAYS} days"
        f" from {START}; needs about {need / 2**30:.1f} GB of disk"
        + ("" if free is None else f" ({free / 2**30:.1f} GB free)"),
        flush=True,
    )
    if free is not None and free < need * 1.2:
        raise SystemExit(
            f"not enough free disk for --rows={args.rows:,}: {free / 2**30:.1f} GB free,"
            f" about {need / 2**30:.1f} GB needed (plus a margin); try fewer --rows"
        )
    compaction = compaction_available(server)
    try:
        with own_database(server) as settings:
            kept = asyncio.run(run(settings, args.rows, args.repeat, compaction))
    except KeyboardInterrupt:
        raise SystemExit("interrupted") from None
    if not kept:
        raise SystemExit("rows or ids were lost (see above)")


if __name__ == "__main__":
    main()
