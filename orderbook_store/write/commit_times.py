"""When the writer last committed a batch and how long its batch writes took, for monitoring.

Kept as bucket counts (the buckets of a Prometheus histogram) rather than a list of latencies:
the writer's cost per committed batch is one bisect and a few additions, and a scrape from
another thread reads a handful of numbers (``orderbook_store.metrics``).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left

__all__ = ["LATENCY_BUCKETS_S", "CommitTimes"]

#: Upper bounds (seconds) of the batch-latency buckets: a healthy write takes milliseconds,
#: one near the 60 s write timeout is in trouble.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


class CommitTimes:
    """Batch-write latencies as histogram buckets, and the time of the last commit."""

    __slots__ = ("_counts", "_last_commit", "_started", "latency_sum_s")

    def __init__(self) -> None:
        #: Batches per bucket (not cumulative); the last one is above every bound.
        self._counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0
        self._started = time.monotonic()
        self._last_commit: float | None = None

    def committed(self, latency_s: float) -> None:
        """Count one successful batch write that took ``latency_s`` seconds."""
        self._counts[bisect_left(LATENCY_BUCKETS_S, latency_s)] += 1
        self.latency_sum_s += latency_s
        self._last_commit = time.monotonic()

    def buckets(self) -> list[tuple[float, int]]:
        """``(upper bound, batches that took at most that long)`` per bound, the last bound
        ``inf`` (its count is every batch). Consistent even while the writer counts on."""
        counts = list(self._counts)  # one copy, so the total is the sum of what is shown
        cumulative: list[tuple[float, int]] = []
        total = 0
        for bound, count in zip((*LATENCY_BUCKETS_S, math.inf), counts, strict=True):
            total += count
            cumulative.append((bound, total))
        return cumulative

    def seconds_since_commit(self) -> float:
        """Seconds since the last successful batch write; before the first, since this writer
        was made (so a writer that never manages to write is noticed too)."""
        last = self._last_commit
        return time.monotonic() - (last if last is not None else self._started)
