"""``orderbook-store doctor``: is this host ready to write and read quotes, and if not, why.

``run_checks(settings)`` connects once (plus once to the read node, when one is set) and
returns a ``Report``: one ``Check`` per concern, each ``ok``, ``warn``, ``fail`` or ``info``
with a short value and a detail saying what to do. A ``fail`` makes the CLI exit non-zero.

Nothing here writes to the database. No check ever shows the password: values are built from
host, port, database and user only, connection errors go through ``engine.unavailable`` (which
scrubs the password), and the report is scrubbed once more before it is returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import asyncpg

from orderbook_store.engine import connector
from orderbook_store.errors import OrderbookStoreError
from orderbook_store.models import OrderbookData
from orderbook_store.ops import migrations
from orderbook_store.ops.compaction import SESSION_LOCK_KEY, reaching_now
from orderbook_store.ops.compaction_steps import CAPTURE
from orderbook_store.ops.partitions import COMPACTED_NOTE, infer_period, partition_of
from orderbook_store.settings import Settings
from orderbook_store.write import dead_letters
from orderbook_store.write.spool_dirs import survey, target_directory

__all__ = ["Check", "Report", "Status", "run", "run_checks"]

Status = Literal["ok", "warn", "fail", "info"]

#: Clock skew (seconds) between this host and the database that earns a warning / a failure.
#: ``local_timestamp`` comes from the host's clock and ``created_at`` from the server's.
SKEW_WARN_S = 1.0
SKEW_FAIL_S = 30.0
#: Share of ``max_connections`` in use that earns a warning.
CONNECTIONS_WARN = 0.8
#: Days of partitions that should exist ahead of today.
PARTITIONS_AHEAD_WARN_DAYS = 2.0
#: Days after its end that a partition may stay uncompacted (the daily job does yesterday's).
COMPACTION_WARN_DAYS = 2.0

_TABLE = OrderbookData.__tablename__


@dataclass(frozen=True)
class Check:
    """One line of the report: what was looked at, how it stands, what it is, what to do."""

    name: str
    status: Status
    value: str
    detail: str = ""


@dataclass
class Report:
    """Every check, in the order they ran; ``ok`` is False when any check failed."""

    target: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.status != "fail" for check in self.checks)

    def check(self, name: str) -> Check:
        """The check called ``name`` (``KeyError`` when it did not run)."""
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)

    def add(self, name: str, status: Status, value: str, detail: str = "") -> None:
        self.checks.append(Check(name, status, value, detail))

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: ``{"ok": ..., "target": ..., "checks": [{name, status, value, detail}]}``."""
        return {
            "ok": self.ok,
            "target": self.target,
            "checks": [asdict(check) for check in self.checks],
        }


def run(settings: Settings | None = None) -> Report:
    """``run_checks`` from synchronous code (the CLI)."""
    return asyncio.run(run_checks(settings if settings is not None else Settings()))


async def run_checks(settings: Settings) -> Report:
    """Run every check against ``settings``' database and this host; never raises for a
    database that is down or misconfigured (that is a ``fail`` in the report)."""
    report = Report(target=settings.describe())
    try:
        started = time.perf_counter()
        conn = await connector(settings)()
        connect_ms = (time.perf_counter() - started) * 1000
    except OrderbookStoreError as exc:
        report.add("connection", "fail", "unreachable", str(exc))
    else:
        try:
            await _database_checks(report, settings, conn, connect_ms)
        except (
            OSError,
            asyncio.TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
        ) as exc:
            report.add("queries", "fail", type(exc).__name__, _first_line(exc))
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=settings.connect_timeout_s)
    await _read_node_check(report, settings)
    _spool_check(report, settings)
    _dead_letter_check(report, settings)
    return _scrubbed(report, settings)


# -- database checks ---------------------------------------------------------------------------


async def _database_checks(
    report: Report, settings: Settings, conn: asyncpg.Connection, connect_ms: float
) -> None:
    round_trips = []
    for _ in range(5):
        started = time.perf_counter()
        await conn.fetchval("SELECT 1")
        round_trips.append((time.perf_counter() - started) * 1000)
    report.add(
        "connection",
        "ok",
        f"{statistics.median(round_trips):.2f} ms round trip",
        f"connected in {connect_ms:.0f} ms as {settings.user!r}",
    )
    await _tls_check(report, settings, conn)
    info = await conn.fetchrow(
        """
        SELECT current_setting('server_version') AS version,
               pg_is_in_recovery() AS in_recovery,
               current_setting('statement_timeout') AS statement_timeout,
               current_setting('idle_in_transaction_session_timeout') AS idle_timeout,
               current_setting('max_connections')::int AS max_connections,
               (SELECT count(*) FROM pg_stat_activity
                 WHERE backend_type = 'client backend') AS connections
        """
    )
    assert info is not None
    if info["in_recovery"]:
        report.add(
            "server",
            "fail",
            f"PostgreSQL {info['version']}",
            "this is a read-only node: DB_HOST must name the primary (read nodes go in "
            "DB_READ_URL or DB_READ_HOST)",
        )
    else:
        report.add("server", "ok", f"PostgreSQL {info['version']}", "primary (accepts writes)")
    report.add(
        "timeouts",
        "ok",
        f"statement_timeout={info['statement_timeout']}, "
        f"idle_in_transaction_session_timeout={info['idle_timeout']}",
        f"connect timeout {settings.connect_timeout_s:g} s; set with DB_STATEMENT_TIMEOUT_MS, "
        "DB_IDLE_IN_TRANSACTION_SESSION_TIMEOUT_MS, DB_CONNECT_TIMEOUT_S",
    )
    used, limit = int(info["connections"]), int(info["max_connections"])
    busy = used >= CONNECTIONS_WARN * limit
    report.add(
        "connections",
        "warn" if busy else "ok",
        f"{used} of max_connections={limit} in use",
        f"this host's pool: up to {settings.pool_size} (DB_POOL_SIZE)"
        + ("; near the limit: use a PgBouncer pool (port 25061)" if busy else ""),
    )
    await _migration_check(report, conn)
    await _table_checks(report, conn)
    await _clock_check(report, conn)


async def _tls_check(report: Report, settings: Settings, conn: asyncpg.Connection) -> None:
    # This host's side of the connection: behind PgBouncer, pg_stat_ssl would describe
    # PgBouncer's own connection to the server, not ours.
    transport = getattr(conn, "_transport", None)
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is not None:
        row: Mapping[str, object] | None = {
            "ssl": True,
            "version": ssl_object.version(),
            "cipher": (ssl_object.cipher() or ("?",))[0],
        }
    else:
        row = await conn.fetchrow(
            "SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
    encrypted = bool(row and row["ssl"])
    mode = settings.sslmode
    if not encrypted:
        local = settings.host in ("localhost", "127.0.0.1", "::1") or settings.host.startswith("/")
        report.add(
            "tls",
            "info" if local else "fail",
            "not encrypted",
            f"sslmode {mode}"
            + ("" if local else ": use DB_SSLMODE=verify-full with DB_SSLROOTCERT (CA file)"),
        )
        return
    assert row is not None
    verified = {
        "verify-full": "certificate and host name verified",
        "verify-ca": "certificate verified, host name not checked",
    }.get(mode, "certificate not verified")
    if mode == "require" and settings.sslrootcert is not None:
        verified = "certificate verified (require with DB_SSLROOTCERT), host name not checked"
    report.add(
        "tls",
        "ok",
        str(row["version"]),
        f"{row['cipher']}; sslmode {mode}: {verified}",
    )


async def _migration_check(report: Report, conn: asyncpg.Connection) -> None:
    try:
        head = migrations.head_revision()
    except OrderbookStoreError as exc:
        head, head_problem = None, str(exc)
    else:
        head_problem = ""
    current = None
    if await conn.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL"):
        try:
            current = await conn.fetchval("SELECT version_num FROM alembic_version")
        except asyncpg.InsufficientPrivilegeError:
            report.add(
                "migrations",
                "warn",
                "unknown",
                "no SELECT on alembic_version: re-run `orderbook-store roles --print-sql`",
            )
            return
    if current is None:
        report.add(
            "migrations", "fail", "not migrated", "run `orderbook-store upgrade` (alembic upgrade)"
        )
    elif head is None:
        report.add("migrations", "info", f"at {current}", f"head unknown: {head_problem}")
    elif current == head:
        report.add("migrations", "ok", f"at head {head}")
    elif current in _known_revisions():
        report.add(
            "migrations",
            "fail",
            f"at {current}, head is {head}",
            "run `orderbook-store upgrade` (alembic upgrade head) before starting writers",
        )
    else:
        report.add(
            "migrations",
            "warn",
            f"at {current}, which this code does not know (head {head})",
            "the database was migrated by newer code: upgrade this package",
        )


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrations.alembic_config(Settings()))
    return {rev.revision for rev in script.walk_revisions()}


async def _table_checks(report: Report, conn: asyncpg.Connection) -> None:
    kind = await conn.fetchval(
        "SELECT c.relkind::text FROM pg_class c WHERE c.oid = to_regclass($1)", _TABLE
    )
    if kind is None:
        report.add("table", "fail", f"{_TABLE} missing", "run `orderbook-store upgrade`")
        report.add("partitions", "info", "no table")
    else:
        size = await conn.fetchrow(
            """
            SELECT coalesce(sum(pg_total_relation_size(t.relid)), 0)::bigint AS bytes,
                   coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint AS rows,
                   bool_or(c.reltuples < 0 AND t.isleaf) AS never_analyzed
            FROM pg_partition_tree(to_regclass($1)) t JOIN pg_class c ON c.oid = t.relid
            """,
            _TABLE,
        )
        assert size is not None
        estimate = f"~{size['rows']:,} rows (estimate)"
        if size["never_analyzed"]:
            estimate += "; not analyzed yet"
        report.add("table", "ok", f"{_format_bytes(int(size['bytes']))}, {estimate}", _TABLE)
        await _partition_check(report, conn, str(kind))
    invalid = await conn.fetch(
        """
        SELECT i.indexrelid::regclass::text AS name
        FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
        WHERE NOT i.indisvalid AND c.relnamespace = current_schema()::regnamespace
        ORDER BY 1
        """
    )
    if invalid:
        names = ", ".join(row["name"] for row in invalid)
        report.add(
            "indexes",
            "fail",
            f"{len(invalid)} invalid",
            f"{names}: a CREATE INDEX CONCURRENTLY failed; REINDEX INDEX CONCURRENTLY each one",
        )
    else:
        report.add("indexes", "ok", "all valid")


async def _partition_check(report: Report, conn: asyncpg.Connection, kind: str) -> None:
    if kind != "p":
        report.add("partitions", "info", "not partitioned")
        return
    rows = await conn.fetch(
        """
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound,
               obj_description(c.oid, 'pg_class') AS note
        FROM pg_partition_tree(to_regclass($1)) t JOIN pg_class c ON c.oid = t.relid
        WHERE t.isleaf AND t.level > 0
        """,
        _TABLE,
    )
    uppers = [u for u in (_upper_bound_s(row["bound"]) for row in rows) if u is not None]
    if not uppers:
        report.add(
            "partitions",
            "fail",
            f"{len(rows)} partitions, none for a time range",
            "new rows have no partition of their own: run `orderbook-store partitions ensure`",
        )
        return
    ahead_days = (max(uppers) - time.time()) / 86400
    status: Status = "ok"
    advice = ""
    if ahead_days <= 0:
        status = "fail"
    elif ahead_days < PARTITIONS_AHEAD_WARN_DAYS:
        status = "warn"
    if status != "ok":
        advice = (
            "run `orderbook-store partitions ensure` as the owner (daily, from cron or deploys)"
        )
    defaults = [row["relname"] for row in rows if row["bound"] == "DEFAULT"]
    if defaults:
        try:
            stray = await conn.fetchval(f"SELECT EXISTS (SELECT FROM {_quote_ident(defaults[0])})")
        except asyncpg.InsufficientPrivilegeError:
            stray = False  # the writer role may not read it; the owner's doctor will
        if stray:
            status = "fail" if status == "fail" else "warn"
            advice = (
                f"rows landed in {defaults[0]} (no partition covers them): run "
                "`orderbook-store partitions ensure` as the owner"
            )
    report.add(
        "partitions",
        status,
        f"{len(rows)} partitions, {ahead_days:.1f} days ahead",
        advice,
    )
    await _compaction_check(report, conn, rows)


async def _compaction_check(
    report: Report, conn: asyncpg.Connection, rows: list[asyncpg.Record]
) -> None:
    """Closed partitions (their range wholly past) should be compacted by the daily job, and a
    history adopted by revision 0004 whose range reaches today split into periods (until then
    ``prune`` cannot retire any of its days); an interrupted compaction keeps its partition's
    late rows aside until a run finishes it."""
    now = time.time()
    found = [partition_of(row["relname"], row["bound"], 0, 0, row["note"]) for row in rows]
    unsplit = reaching_now(found, infer_period(found), int(now * 1_000_000))
    closed = [
        (row["relname"], upper, bool(COMPACTED_NOTE.match(row["note"] or "")))
        for row in rows
        if (upper := _upper_bound_s(row["bound"])) is not None and upper <= now
    ]
    done = sum(compacted for _, _, compacted in closed)
    value = f"{done} of {len(closed)} closed partitions compacted"
    overdue = [
        (upper, name)
        for name, upper, compacted in closed
        if not compacted and upper < now - COMPACTION_WARN_DAYS * 86400
    ]
    running = await conn.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND classid = 0 AND objid = $1 AND objsubid = 1 "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        SESSION_LOCK_KEY,
    )
    captured = await conn.fetch(
        "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "WHERE t.tgname = $1 ORDER BY 1",
        CAPTURE,
    )
    run_it = "run `orderbook-store partitions compact` as the owner"
    if running is not None:
        report.add("compaction", "info", value, f"a compaction is running now (pid {running})")
    elif captured:
        names = ", ".join(row["relname"] for row in captured)
        report.add(
            "compaction",
            "warn",
            value + "; one was interrupted",
            f"{names}: rows written to it meanwhile are held aside and its rows cannot be "
            f"changed until it finishes: {run_it} to finish it",
        )
    elif unsplit:
        report.add(
            "compaction",
            "warn",
            f"{value}; {unsplit[0].name} spans past days and today",
            f"prune cannot retire its old days until it is split into periods: {run_it}",
        )
    elif overdue:
        ended = dt.datetime.fromtimestamp(min(overdue)[0], dt.timezone.utc)
        report.add(
            "compaction",
            "warn",
            f"{value}; {len(overdue)} overdue",
            f"{min(overdue)[1]} ended {ended:%Y-%m-%d}: {run_it} daily, after ensure",
        )
    else:
        report.add("compaction", "ok", value)


def _upper_bound_s(bound: str) -> float | None:
    """The TO bound of a range partition as epoch seconds (integer µs/ms/s or a timestamp)."""
    match = re.search(r"TO \('?([^')]+)'?\)", bound or "")
    if not match or match.group(1) == "MAXVALUE":
        return None
    value = match.group(1)
    if re.fullmatch(r"-?\d+", value):
        number = int(value)
        for scale in (1e6, 1e3, 1.0):  # µs (the table's convention), ms, s
            if abs(number) / scale < 1e11:
                return number / scale
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()


async def _clock_check(report: Report, conn: asyncpg.Connection) -> None:
    before = time.time()
    server = float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8"))
    after = time.time()
    skew = server - (before + after) / 2
    status: Status = "ok"
    if abs(skew) >= SKEW_FAIL_S:
        status = "fail"
    elif abs(skew) >= SKEW_WARN_S:
        status = "warn"
    report.add(
        "clock",
        status,
        f"database {'ahead of' if skew >= 0 else 'behind'} this host by {abs(skew):.3f} s",
        "" if status == "ok" else "run NTP (chrony) on this host: local_timestamp uses its clock",
    )


async def _read_node_check(report: Report, settings: Settings) -> None:
    replica = settings.read_settings()
    if replica is None:
        return
    try:
        conn = await connector(replica)()
    except OrderbookStoreError as exc:
        report.add("read node", "warn", "unreachable", f"reads go to the primary: {exc}")
        return
    try:
        row = await conn.fetchrow(
            """
            SELECT pg_is_in_recovery() AS in_recovery,
                   CASE WHEN NOT pg_is_in_recovery() THEN 0
                        WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
                        ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8
                   END AS lag_s
            """
        )
    finally:
        with contextlib.suppress(Exception):
            await conn.close(timeout=settings.connect_timeout_s)
    assert row is not None
    lag = row["lag_s"]
    where = replica.describe()
    if not row["in_recovery"]:
        report.add("read node", "warn", "not a replica", f"{where} accepts writes")
    elif lag is None or lag > settings.read_max_lag_s:
        shown = "unknown" if lag is None else f"{lag:.1f} s"
        report.add(
            "read node",
            "warn",
            f"lagging {shown}",
            f"{where}: over DB_READ_MAX_LAG_S={settings.read_max_lag_s:g}; reads use the primary",
        )
    else:
        report.add("read node", "ok", f"lag {lag:.1f} s", where)


# -- this host ---------------------------------------------------------------------------------


def spool_directory(settings: Settings) -> Path:
    """Where writers on this host spool batches for ``settings``' database."""
    return target_directory(settings.spool_dir, settings.host, settings.port, settings.name)


def _spool_check(report: Report, settings: Settings) -> None:
    directory = spool_directory(settings)
    found = survey(directory)
    if found.stopped_rows:
        report.add(
            "spool",
            "warn",
            f"{found.stopped_rows:,} rows waiting",
            f"{found.stopped_writers} spool(s) of stopped writers in {directory}: the next "
            "writer on this host replays them (start the collector, or any "
            "OrderbookRepository that writes)",
        )
    elif found.running_rows:
        report.add(
            "spool",
            "warn",
            f"{found.running_rows:,} rows spooled by running writers",
            f"{found.running_writers} running writer(s) could not reach the database and are "
            "catching up",
        )
    else:
        report.add("spool", "ok", "empty", str(directory))


def dead_letter_file(settings: Settings) -> Path:
    """Where writers on this host keep the rows ``settings``' database refused."""
    return spool_directory(settings) / dead_letters.FILE_NAME


def _dead_letter_check(report: Report, settings: Settings) -> None:
    path = dead_letter_file(settings)
    count = len(dead_letters.read(path))
    if count:
        report.add(
            "dead letters",
            "warn",
            f"{count:,} rows refused",
            f"the server refused them (a constraint, the encoding...); kept in {path}: "
            "`orderbook-store dead-letters` lists them with the server's reasons",
        )
    else:
        report.add("dead letters", "ok", "none", str(path))


# -- helpers -----------------------------------------------------------------------------------


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _scrubbed(report: Report, settings: Settings) -> Report:
    """The report with the password (should it ever appear) replaced by ``***``."""
    secrets = [s.get_secret_value() for s in (settings.password,) if s is not None]
    replica = settings.read_settings()
    if replica is not None and replica.password is not None:
        secrets.append(replica.password.get_secret_value())
    secrets = [s for s in secrets if s]
    if not secrets:
        return report

    def scrub(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    report.checks = [
        Check(c.name, c.status, scrub(c.value), scrub(c.detail)) for c in report.checks
    ]
    report.target = scrub(report.target)
    return report
