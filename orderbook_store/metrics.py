"""The writer's counters and latencies as Prometheus metrics; one line exposes them.

A collector process adds one line after making its repository::

    from orderbook_store import metrics

    metrics.serve(repo, port=9108)  # http://<host>:9108/metrics

``serve`` takes several repositories (``serve(repo_a, repo_b, port=9108)``) and the old
collector's ``PostgreSQLManager`` or ``DataManager`` once connected. To put the series on a
registry of your own (an existing exporter, an ASGI app, a push gateway):
``metrics.register(repo, registry)``.

Every series carries ``database="<name>@<host>:<port>"`` (never the user or password), so one
process writing to two databases exports both. Prefix ``orderbook_store_writer_``:

* counters (``_total``): ``rows_added`` (quotes ``add`` took), ``rows_written`` (committed),
  ``rows_spooled`` (put in the disk spool), ``rows_replayed`` (written from the spool),
  ``rows_rejected`` (invalid quotes ``add`` refused), ``rows_refused`` (rows the server
  refused, in the dead-letter file), ``retries`` (failed write attempts), ``batches``
  (committed transactions);
* gauges: ``rows_pending`` (in memory, not yet written), ``rows_in_spool``,
  ``writes_blocked`` (1 while a configuration problem, such as a wrong password, missing
  privileges or an unmigrated database, keeps rows out of the table), and
  ``seconds_since_last_commit`` (since the writer was made, before its first commit);
* histogram ``batch_latency_seconds``: each successful batch write (pool checkout, COPY,
  commit).

Why read ``stats()`` when scraped instead of counting in ``add``: the hot path stays exactly
as fast as without metrics, and a scrape costs a few attribute reads per writer. A scrape runs
in the HTTP server's thread while the writer runs on its event loop; a read that catches the
writer between two updates can see a counter a batch lower than before, so each counter shows
the highest value it has shown, and a read interrupted by the writer is read again.

A writer is held weakly: once its repository is gone, its series go too. Needs
``prometheus_client``: ``pip install 'orderbook_store[metrics]'``.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

try:
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError:  # pragma: no cover - depends on the installation
    raise ModuleNotFoundError(
        "orderbook_store.metrics needs prometheus_client: pip install 'orderbook_store[metrics]'",
        name="prometheus_client",
    ) from None

from orderbook_store.errors import InvalidArgument
from orderbook_store.legacy_collector import DataManager, PostgreSQLManager
from orderbook_store.repository import OrderbookRepository
from orderbook_store.settings import Settings
from orderbook_store.write.writer import Writer, WriterStats

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

__all__ = ["Exportable", "WriterCollector", "database_label", "register", "serve", "unregister"]

#: What ``register`` and ``serve`` accept: whatever owns a buffered writer.
Exportable: TypeAlias = OrderbookRepository | PostgreSQLManager | DataManager

PREFIX = "orderbook_store_writer_"

#: WriterStats fields exported as counters, with their help text.
_COUNTERS: tuple[tuple[str, str], ...] = (
    ("rows_added", "Quotes add() took (valid ones)."),
    ("rows_written", "Rows committed to the table, directly or from the spool."),
    ("rows_spooled", "Rows put in the disk spool (database away or slow, or memory full)."),
    ("rows_replayed", "Rows written from the spool, including batches a stopped writer left."),
    ("rows_rejected", "Quotes add() refused as invalid (InvalidQuote)."),
    ("rows_refused", "Rows the server refused (a constraint), kept in the dead-letter file."),
    ("retries", "Failed write attempts, each retried."),
    ("batches", "Batches committed, one transaction each."),
)
_GAUGES: tuple[tuple[str, str], ...] = (
    ("rows_pending", "Rows in memory, not yet written."),
    ("rows_in_spool", "Rows in the disk spool, waiting to be written."),
    (
        "writes_blocked",
        "1 while a configuration problem (password, privileges, schema, TLS) "
        "keeps rows out of the table, else 0.",
    ),
    (
        "seconds_since_last_commit",
        "Seconds since the last successful batch write (since the "
        "writer was made, before its first).",
    ),
)
_HISTOGRAM = (
    "batch_latency_seconds",
    "Seconds one successful batch write took (pool checkout, COPY, commit).",
)
_LABELS = ["database"]
#: Reads of stats() interrupted by the writer changing a batch list, tried again this often.
_READ_TRIES = 5


def database_label(settings: Settings) -> str:
    """``name@host:port``: which database a series is about (no user, no password)."""
    return f"{settings.name}@{settings.host}:{settings.port}"


@dataclass
class _Exported:
    writer: weakref.ref[Writer]
    #: The highest value each counter has shown: counters never go down.
    shown: dict[str, float] = field(default_factory=dict)


class WriterCollector(Collector):
    """The writers exported on one registry, read when it is scraped. ``register`` makes one
    per registry; there is no need to make one yourself."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._exported: dict[str, _Exported] = {}

    def add(self, database: str, writer: Writer) -> None:
        """Export ``writer``'s series under ``database``; a second writer under the same label
        is an ``InvalidArgument`` (both would claim the same series)."""
        with self._lock:
            current = self._exported.get(database)
            if current is not None:
                held = current.writer()
                if held is writer:
                    return
                if held is not None:
                    raise InvalidArgument(
                        f"metrics: database={database!r} is already exported on this registry "
                        "by another repository; pass database='<a distinct label>' to tell "
                        "them apart"
                    )
            self._exported[database] = _Exported(weakref.ref(writer))

    def remove(self, writer: Writer) -> None:
        """Stop exporting ``writer`` (nothing happens if it is not exported)."""
        with self._lock:
            for database, entry in list(self._exported.items()):
                if entry.writer() is writer:
                    del self._exported[database]

    def describe(self) -> Iterator[Metric]:
        """The metric names, without samples (for the registry's duplicate check)."""
        return _families().all()

    def collect(self) -> Iterator[Metric]:
        """Every exported writer's series, read now."""
        families = _families()
        with self._lock:  # concurrent scrapes: one at a time updates ``shown``
            for database, entry in list(self._exported.items()):
                writer = entry.writer()
                if writer is None:  # its repository is gone
                    del self._exported[database]
                    continue
                _sample(families, database, entry, writer)
        return families.all()


@dataclass
class _Families:
    """One family per metric, samples added per writer."""

    counters: dict[str, CounterMetricFamily]
    gauges: dict[str, GaugeMetricFamily]
    latency: HistogramMetricFamily

    def all(self) -> Iterator[Metric]:
        yield from self.counters.values()
        yield from self.gauges.values()
        yield self.latency


def _families() -> _Families:
    name, help_text = _HISTOGRAM
    return _Families(
        counters={n: CounterMetricFamily(PREFIX + n, h, labels=_LABELS) for n, h in _COUNTERS},
        gauges={n: GaugeMetricFamily(PREFIX + n, h, labels=_LABELS) for n, h in _GAUGES},
        latency=HistogramMetricFamily(PREFIX + name, help_text, labels=_LABELS),
    )


def _bound(upper_s: float) -> str:
    """A bucket's ``le`` as Prometheus writes it."""
    return "+Inf" if math.isinf(upper_s) else repr(upper_s)


def _read_stats(writer: Writer) -> WriterStats:
    for _ in range(_READ_TRIES - 1):
        try:
            return writer.stats()
        except RuntimeError:  # "deque mutated during iteration": the writer moved a batch
            continue
    return writer.stats()


def _sample(families: _Families, database: str, entry: _Exported, writer: Writer) -> None:
    stats = _read_stats(writer)
    times = writer.commit_times
    labels = [database]
    for name, counter in families.counters.items():
        value = max(float(getattr(stats, name)), entry.shown.get(name, 0.0))
        entry.shown[name] = value
        counter.add_metric(labels, value)
    gauges = {
        "rows_pending": stats.rows_pending,
        "rows_in_spool": stats.rows_in_spool,
        "writes_blocked": 0 if writer.writes_blocked is None else 1,
        "seconds_since_last_commit": times.seconds_since_commit(),
    }
    for name, family in families.gauges.items():
        family.add_metric(labels, float(gauges[name]))
    families.latency.add_metric(
        labels,
        [(_bound(upper), float(count)) for upper, count in times.buckets()],
        sum_value=times.latency_sum_s,
    )


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, WriterCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def _collector_for(registry: CollectorRegistry) -> WriterCollector:
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _collectors[registry] = WriterCollector()
            registry.register(collector)
        return collector


def _writer_of(source: Exportable) -> tuple[str, Writer]:
    """(label, writer) of what ``register`` was given; the writer is made now, in the
    caller's thread, never later by a scrape in the server's."""
    if isinstance(source, DataManager):
        storage = source.storage
        if not isinstance(storage, PostgreSQLManager):
            raise InvalidArgument(
                f"metrics: a DataManager with storage.type={source.storage_type!r} writes "
                "files, not to a database: it has no writer to export"
            )
        source = storage
    if isinstance(source, PostgreSQLManager):
        if source.repository is None:
            raise InvalidArgument(
                "metrics: a PostgreSQLManager has a writer only between connect() and "
                "shutdown(): register it after connect()"
            )
        source = source.repository
    if isinstance(source, OrderbookRepository):
        return database_label(source.settings), source.writer
    kind = type(source).__name__
    hint = (
        ": it has no buffered writer (insert_many writes at once)"
        if kind == "OrderbookStore"
        else ""
    )
    raise InvalidArgument(
        f"metrics: cannot export a {kind}{hint}; expected an OrderbookRepository, "
        "PostgreSQLManager or DataManager"
    )


def register(
    source: Exportable,
    registry: CollectorRegistry | None = None,
    *,
    database: str | None = None,
) -> None:
    """Export ``source``'s writer on ``registry`` (default: prometheus_client's ``REGISTRY``).

    ``database`` replaces the label ``name@host:port``, for two repositories on one database.
    Registering the same repository again does nothing. Raises ``InvalidArgument`` for
    something without a database writer, a ``PostgreSQLManager`` not connected, or a label
    another repository already exports on that registry.
    """
    label, writer = _writer_of(source)
    if database is not None and (not isinstance(database, str) or not database.strip()):
        raise InvalidArgument(f"metrics: database={database!r}; expected a non-empty label")
    _collector_for(registry if registry is not None else REGISTRY).add(database or label, writer)


def unregister(source: Exportable, registry: CollectorRegistry | None = None) -> None:
    """Stop exporting ``source``'s writer on ``registry`` (default ``REGISTRY``)."""
    _label, writer = _writer_of(source)
    with _collectors_lock:
        collector = _collectors.get(registry if registry is not None else REGISTRY)
    if collector is not None:
        collector.remove(writer)


def serve(
    *sources: Exportable,
    port: int = 9108,
    addr: str = "0.0.0.0",  # noqa: S104 - Prometheus scrapes from another host
    registry: CollectorRegistry | None = None,
) -> WSGIServer:
    """Export each source on ``registry`` (default ``REGISTRY``, which also has the process's
    CPU, memory and GC metrics) and serve it over HTTP on ``addr:port`` from a daemon thread.

    Returns the server: ``server.server_port`` is the port (useful with ``port=0``, any free
    one), ``server.shutdown()`` stops it. Pass ``addr="127.0.0.1"`` to serve only this host.
    Raises ``InvalidArgument`` for a port outside 0-65535 and ``OSError`` naming the address
    when it cannot be listened on (already in use).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgument(f"metrics.serve: port={port!r}; expected 0-65535 (0: any free)")
    target = registry if registry is not None else REGISTRY
    for source in sources:
        register(source, target)
    try:
        server, _thread = start_http_server(port, addr, target)
    except OSError as exc:
        raise OSError(
            exc.errno, f"metrics.serve: cannot listen on {addr}:{port}: {exc.strerror or exc}"
        ) from None
    return server
